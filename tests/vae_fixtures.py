"""The demo VAE and a few coloured squares: a 30-step training check shared by the VAE and precision tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdray.models.components import load_components
from sdray.pipeline_config import load_pipeline_config
from sdray.vae.loss import psnr, reconstruct


def demo_vae_and_squares() -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo preset's VAE (seeded) and four 32 px images, each a 10 px square of one channel on black.

    32 px keeps the tests fast; the architecture is size-agnostic.
    """
    torch.manual_seed(0)
    vae = load_components(load_pipeline_config("demo").model, ["vae"]).vae
    images = -torch.ones(4, 3, 32, 32)
    for i in range(4):
        images[i, i % 3, 4 + 4 * i : 14 + 4 * i, 5:15] = 1.0
    return vae, images


def psnr_gain(vae: torch.nn.Module, images: torch.Tensor, step: Callable[[], None], steps: int = 30) -> float:
    """dB of mean reconstruction PSNR that ``steps`` calls of ``step`` (one optimizer step each) gain."""
    before = psnr(reconstruct(vae.eval(), images), images).mean().item()
    vae.train()
    for _ in range(steps):
        step()
    return psnr(reconstruct(vae.eval(), images), images).mean().item() - before
