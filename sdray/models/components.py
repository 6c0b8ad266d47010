"""SDComponents: tokenizer, text encoder, VAE, UNet and noise scheduler, built or loaded, never downloaded."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdray.errors import ConfigError, InputError
from sdray.models.config import COMPONENT_NAMES, ModelConfig, check_model_path, load_part_dir
from sdray.models.presets import PRESETS
from sdray.models.tokenizer import load_tokenizer
from sdray.storage import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model; a part not asked for is None."""

    tokenizer: CLIPTokenizer | None = None
    text_encoder: CLIPTextModel | None = None
    vae: AutoencoderKL | None = None
    unet: UNet2DConditionModel | None = None
    scheduler: SchedulerMixin | None = None

    def require(self, *names: str) -> None:
        """Raise if any named part is missing (e.g. a directory without vae/)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise InputError(f"model is missing component(s): {', '.join(missing)}")

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1); 8 for SD."""
        self.require("vae")
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_scaling_factor(self) -> float:
        self.require("vae")
        return float(self.vae.config.scaling_factor)

    @property
    def text_embed_dim(self) -> int:
        self.require("text_encoder")
        return int(self.text_encoder.config.hidden_size)

    def pipeline(self) -> StableDiffusionPipeline:
        """A diffusers StableDiffusionPipeline sharing these modules (no safety checker)."""
        self.require(*COMPONENT_NAMES)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# Process-wide state is swapped while a part is made: the global torch RNG (presets, `_seeded`) and, in
# from_pretrained, torch.nn.Module's parameter registration (accelerate's init_empty_weights). Threads that
# load at once (DreamBooth preprocesses two image sets side by side) would corrupt each other's weights.
_ONE_LOAD_AT_A_TIME = threading.Lock()


def load_components(cfg: ModelConfig, parts: Iterable[str] = COMPONENT_NAMES) -> SDComponents:
    """Build (preset) or load (``cfg.path``) the requested parts, in eval mode on the CPU, fp32."""
    parts = tuple(parts)
    unknown = set(parts) - set(COMPONENT_NAMES)
    if unknown:
        raise ConfigError(f"unknown model component(s) {sorted(unknown)}; known: {COMPONENT_NAMES}")
    check_model_path(cfg, parts)
    loader = _load_part if cfg.path else _build_part
    with _ONE_LOAD_AT_A_TIME:
        components = SDComponents(
            **{name: load_tokenizer(cfg) if name == "tokenizer" else loader(cfg, name) for name in parts}
        )
    for module in (components.text_encoder, components.vae, components.unet):
        if module is not None:
            module.eval()
    return components


def save_components(components: SDComponents, out_dir: str | Path) -> Path:
    """Write a diffusers-format directory (safetensors) atomically: a temp dir renamed into place."""
    with atomic_dir(out_dir, overwrite=True) as tmp:
        components.pipeline().save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def _seeded(seed: int, name: str, build: Callable[[], Any]) -> Any:
    """Build with a per-part seed so building one part alone gives the same weights as building all."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + zlib.crc32(name.encode()))
        return build()


def _build_part(cfg: ModelConfig, name: str) -> Any:
    preset = PRESETS[cfg.preset]
    overrides: dict[str, Any] = getattr(cfg, name, {})
    kwargs = {**preset.get(name, {}), **overrides}
    try:
        if name == "scheduler":
            return DDPMScheduler.from_config(kwargs)
        if name == "text_encoder":
            return _seeded(cfg.seed, name, lambda: CLIPTextModel(CLIPTextConfig(**kwargs)))
        if name == "vae":
            return _seeded(cfg.seed, name, lambda: AutoencoderKL(**kwargs))
        return _seeded(cfg.seed, name, lambda: UNet2DConditionModel(**kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.{name}: invalid architecture override: {exc}") from exc


_LOADERS: dict[str, Callable[[str], Any]] = {
    "text_encoder": lambda p: CLIPTextModel.from_pretrained(
        p, subfolder="text_encoder", use_safetensors=True
    ),
    "vae": lambda p: AutoencoderKL.from_pretrained(p, subfolder="vae", use_safetensors=True),
    "unet": lambda p: UNet2DConditionModel.from_pretrained(p, subfolder="unet", use_safetensors=True),
    "scheduler": lambda p: DDPMScheduler.from_pretrained(p, subfolder="scheduler"),
}


def _load_part(cfg: ModelConfig, name: str) -> Any:
    return load_part_dir(cfg, name, _LOADERS[name])
