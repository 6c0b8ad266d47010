"""For tracking tests: a real MLflow tracking server on 127.0.0.1 (SQLite backend, local artifact store), and
a reader of TensorBoard event files."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
from serve_fixtures import free_port


@dataclass
class MlflowServer:
    uri: str
    """http://127.0.0.1:PORT"""
    store_uri: str
    """sqlite:///... of the backend store: readable with an MlflowClient after the server is gone."""
    proc: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_mlflow_server(root: Path, *, timeout_s: float = 300) -> MlflowServer:
    port = free_port()
    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes to it until killed
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", store_uri=store, proc=proc)
    deadline = time.monotonic() + timeout_s  # ~5 s idle; minutes on a loaded 2-core machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.uri}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(
        f"mlflow server not ready after {timeout_s} s: {(root / 'server.log').read_text()[-2000:]}"
    )


def tensorboard_steps(directory: Path) -> dict[str, list[int]]:
    """tag -> steps of the summaries in the event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    steps: dict[str, list[int]] = defaultdict(list)
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                steps[value.tag].append(event.step)
    return steps
