"""The HTTP layer in-process: auth and body limits when the app is mounted under a route prefix.

Serve hands a replica the full path with the route prefix in ``root_path`` (an app deployed at ``/sd`` sees
``path="/sd/v1/..."``, ``root_path="/sd"``); Starlette's TestClient with ``root_path`` builds the same scope.
The running-app tests (test_serve.py) cover the root prefix over real HTTP.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sdray.serve.adapters import AdapterCatalog
from sdray.serve.api import create_api
from sdray.serve.config import ServeConfig
from sdray.serve.request import Generation, GenerationRequest, ModelInfo
from sdray.serve.sampler import to_png

KEY = "prefix-key"
INFO = ModelInfo(source="tiny", native_size=64, size_multiple=8, max_tokens=77)


class EchoBackend:
    """Answers with blank PNGs of the requested size; counts the requests that reached it."""

    def __init__(self) -> None:
        self.cfg = ServeConfig(max_body_bytes=1024)
        self.api_key = KEY
        self.adapters = AdapterCatalog(None)
        self.generated = 0

    async def model_info(self) -> ModelInfo:
        return INFO

    async def model_health(self) -> str | None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    async def generate(self, req: GenerationRequest) -> Generation:
        import numpy as np

        self.generated += 1
        pngs = [to_png(np.zeros((req.height, req.width, 3), "float32")) for _ in req.seeds]
        return Generation(pngs, model_ms=12.5, batch_requests=1)


@pytest.fixture
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
def client(backend: EchoBackend) -> TestClient:
    return TestClient(create_api(backend), root_path="/sd")


def test_api_under_a_route_prefix_still_needs_the_key(client, backend):
    body = {"prompt": "a red circle", "size": "16x8"}
    assert client.post("/sd/v1/images/generations", json=body).status_code == 401
    assert client.get("/sd/v1/models").status_code == 401
    wrong = client.post("/sd/sdapi/v1/txt2img", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert backend.generated == 0
    ok = client.post("/sd/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert ok.headers["Server-Timing"].startswith(
        'model;dur=12.5;desc="sampler + PNG, batch of 1", ingress;dur='
    )
    assert backend.generated == 1
    assert client.get("/sd/healthz").json() == {"status": "ok", "model": "tiny"}  # no key for health


def test_body_limits_apply_before_parsing(client, backend):
    auth = {"Authorization": f"Bearer {KEY}"}
    huge = client.post("/sd/v1/images/generations", json={"prompt": "x" * 2000}, headers=auth)
    assert huge.status_code == 413 and huge.json() == {"detail": "body: larger than 1024 bytes"}
    chunked = client.post("/sd/v1/images/generations", content=iter([b'{"prompt": "a"}']), headers=auth)
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]
    assert backend.generated == 0


def test_size_errors_are_said_once_and_name_the_real_problem(client):
    auth = {"Authorization": f"Bearer {KEY}"}
    square = client.post("/sd/v1/images/generations", json={"prompt": "a", "size": "60x60"}, headers=auth)
    assert square.status_code == 422
    assert [d["msg"] for d in square.json()["detail"]] == ["size must be a multiple of 8, got 60"]
    big = client.post("/sd/v1/images/generations", json={"prompt": "a", "size": "2048x2048"}, headers=auth)
    assert [d["msg"] for d in big.json()["detail"]] == ["size must be in 8..1024 pixels, got 2048"]


def test_refused_body_is_read_so_urllib_sees_the_413(backend):
    # Without Ray: the same app behind a real uvicorn server. urllib sends the whole body before reading the
    # answer; had the server answered without reading it, the client would see a connection reset.
    import json
    import threading
    import time
    import urllib.error
    import urllib.request

    import uvicorn
    from serve_fixtures import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_api(backend), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        body = json.dumps({"prompt": "a", "pad": "x" * 20_000_000}).encode()
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body, headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert json.loads(refused.value.read()) == {"detail": "body: larger than 1024 bytes"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
