"""Export a trained VAE in diffusers format, and assemble a full model directory around it.

`export_vae` writes `<out>/` (config.json + diffusion_pytorch_model.safetensors) with a scaling factor measured
on the data: 1 / std of the posterior means, so latents scaled by it have unit variance, as the UNet expects
(SD's 0.18215 was measured the same way on its own VAE). `assemble_model_dir` combines such a VAE with the
text encoder, tokenizer, UNet and scheduler of a model config, giving the directory `model.path` loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from sdray.errors import ConfigError, InputError
from sdray.models.components import load_components, save_components
from sdray.models.config import COMPONENT_NAMES, ModelConfig
from sdray.storage import atomic_dir
from sdray.vae.config import VaeTrainConfig
from sdray.vae.data import PIXELS, to_model_input

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` ((N, 3, R, R) in [-1, 1])."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(64)])  # (N, C, h, w)
    return float(1.0 / latents.float().std())


def export_vae(state_dict: dict, model_cfg: ModelConfig, cfg: VaeTrainConfig, train_ds, out_dir: Path):
    """Load trained weights into the configured architecture, set the scaling factor, save atomically.

    Args:
        state_dict: AutoencoderKL weights from a training checkpoint.
        train_ds: Ray Dataset of {"pixels": uint8 (3, R, R)} rows; up to ``cfg.scaling_images`` are encoded.

    Returns:
        (out_dir, scaling factor written to its config).
    """
    vae = load_components(model_cfg, ["vae"]).vae
    vae.load_state_dict(state_dict)
    vae.eval()
    scaling = float(vae.config.scaling_factor)
    if cfg.scaling_images:
        pixels = torch.from_numpy(
            np.array(train_ds.take_batch(cfg.scaling_images, batch_format="numpy")[PIXELS])
        )
        scaling = measure_scaling_factor(vae, to_model_input(pixels))
        vae.register_to_config(scaling_factor=scaling)
        log.info("scaling factor %.4f from %d training images", scaling, len(pixels))
    with atomic_dir(out_dir, overwrite=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return out_dir, scaling


def assemble_model_dir(vae_dir: str | Path, model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """A diffusers model directory whose `vae/` is the one in ``vae_dir`` and whose other parts come from
    ``model_cfg`` (a preset with overrides, or ``model_cfg.path``). Written atomically.

    Raises:
        InputError: ``vae_dir`` holds no loadable AutoencoderKL.
        ConfigError: the UNet's input channels do not match the VAE's latent channels.
    """
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{vae_dir}: not a diffusers AutoencoderKL directory: {exc}") from exc
    components = load_components(model_cfg, [n for n in COMPONENT_NAMES if n != "vae"])
    components.vae = vae.eval()
    latent, unet_in = vae.config.latent_channels, components.unet.config.in_channels
    if latent != unet_in:
        raise ConfigError(f"the VAE has {latent} latent channels but model.unet.in_channels is {unet_in}")
    return save_components(components, out_dir)
