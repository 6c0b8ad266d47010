"""`python tests/moto_s3_server.py HOST PORT`: moto's S3 server, answering CompleteMultipartUpload as S3 does.

moto (5.2) names the root element of that answer `CompleteMultipartUploadResponse`; Amazon S3 answers
`CompleteMultipartUploadResult` (API reference, CompleteMultipartUpload). Arrow's S3 client checks that answer for
an error hidden in a 200 OK and, not finding the element it expects, fails the upload. This wrapper renames
the element in moto's answer and changes nothing else, so every multipart write (pyarrow, Ray Train
checkpoints) takes the same code path it takes against real S3.
"""

from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

_WRONG, _RIGHT = b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult"


class FixCompleteMultipartUpload:
    """WSGI middleware: rename the root element of CompleteMultipartUpload answers."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId" not in environ.get("QUERY_STRING", ""):
            return self.app(environ, start_response)
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)

        body = b"".join(self.app(environ, capture)).replace(_WRONG, _RIGHT)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(
            captured["status"], [*headers, ("Content-Length", str(len(body)))], captured["exc_info"]
        )
        return [body]


def main(argv: list[str]) -> None:
    host, port = argv[0], int(argv[1])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, FixCompleteMultipartUpload(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1:])
