"""ModelConfig: which Stable Diffusion components to build or load. Light: imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sdray.errors import ConfigError

Preset = Literal["tiny", "sd15"]
COMPONENT_NAMES = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    preset: Preset = "tiny"
    """Architecture to build with random weights when `path` is empty: `tiny` (tests, demo) or `sd15`."""
    path: str = ""
    """A diffusers-format directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/); overrides `preset`."""
    seed: int = 0
    """Seed of the random initialisation, so every stage and worker builds identical preset weights."""
    unet: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's UNet2DConditionModel config (e.g. block_out_channels)."""
    vae: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's AutoencoderKL config."""
    text_encoder: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's CLIPTextConfig."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's noise schedule (num_train_timesteps, beta_*, prediction_type)."""

    def __post_init__(self) -> None:
        if self.path and any((self.unet, self.vae, self.text_encoder)):
            raise ConfigError(
                "model.path loads a saved architecture; drop the unet/vae/text_encoder overrides"
            )

    @property
    def source(self) -> str:
        """Human-readable origin of the weights, for logs and metadata."""
        return self.path or f"preset:{self.preset} (random init, seed {self.seed})"
