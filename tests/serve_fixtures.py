"""Helpers for the Serve test modules: a free port, and one running sdray app per module."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
from collections.abc import Iterator

import numpy as np
from PIL import Image

from sdray.models.config import ModelConfig
from sdray.serve.config import ServeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(
    serve_cfg: ServeConfig, model_cfg: ModelConfig, *, api_key: str | None = None
) -> Iterator[str]:
    """Serve's HTTP proxy on ``serve_cfg.port`` with the sdray app deployed; yields the base URL (needs Ray)."""
    from ray import serve

    from sdray.serve.app import start

    try:
        yield start(serve_cfg, model_cfg, api_key=api_key).rstrip("/")
    finally:
        serve.shutdown()


def decode_png(b64: str) -> np.ndarray:
    """base64 PNG -> (H, W, 3) uint8, asserting it really is a PNG."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))
