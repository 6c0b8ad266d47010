"""A real S3-compatible server on localhost (moto) for object-storage tests, reached through the usual env vars.

The library has no test-only code path: it finds the endpoint and keys the way it does on a cloud, through
`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_DEFAULT_REGION`. Those must be set
before Ray starts, so the stages run as subprocesses (the `sdray` CLI) with ``S3Server.env``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "sdray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]
    """os.environ plus the S3 variables: pass to subprocesses (and so to the Ray they start)."""

    def filesystem(self):
        """A pyarrow S3FileSystem on the server, configured explicitly (for test setup and checks)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_DEFAULT_REGION"],
        )

    def upload(self, local: Path, key: str) -> str:
        """Copy a local file or directory to ``s3://bucket/key``; returns the URI."""
        import pyarrow.fs as pafs

        target = f"{self.bucket}/{key}"
        pafs.copy_files(str(local), target, destination_filesystem=self.filesystem())
        return f"s3://{target}"

    def list(self, key: str) -> list[str]:
        """Object keys under ``key`` (relative to it), sorted."""
        import pyarrow.fs as pafs

        prefix = f"{self.bucket}/{key.rstrip('/')}"
        infos = self.filesystem().get_file_info(
            pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
        )
        return sorted(i.path[len(prefix) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout} s")


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto_server on a free port with one bucket; stopped (by its PID) on exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("moto_s3_server.py")), "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_up(f"{endpoint}/moto-api/", proc)
        keys = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            region_name=keys["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=BUCKET)
        yield S3Server(
            endpoint=endpoint, bucket=BUCKET, env={**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, **keys}
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the whole test session."""
    with moto_s3() as server:
        yield server
