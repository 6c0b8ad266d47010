"""Helpers for the Serve test modules: a free port, and one running sdray app per module."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

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


def make_adapter_store(root: Path) -> Path:
    """A LoRA adapter store for the tiny model: red, blue, green (distinct non-zero adapters, as after
    training), `broken` (a corrupt weights file) and `wide` (an adapter of a wider UNet: another base)."""
    import torch

    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.train.config import LoraConfig
    from sdray.train.lora import add_adapter, save_lora_dir

    lora = LoraConfig(enabled=True, rank=4, alpha=2.0)
    for seed, name in enumerate(["red", "blue", "green"]):
        unet = load_components(ModelConfig(), ["unet"]).unet
        add_adapter(unet, lora, seed=seed)
        gen = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for key, p in unet.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        (root / name).mkdir(parents=True)
        save_lora_dir(unet, root / name)
    (root / "broken").mkdir()
    (root / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file" * 10)
    wide = load_components(ModelConfig(unet={"block_out_channels": [64, 64]}), ["unet"]).unet
    add_adapter(wide, lora, seed=0)
    (root / "wide").mkdir()
    save_lora_dir(wide, root / "wide")
    (root / "notes").mkdir()  # no weights file: not an adapter
    return root
