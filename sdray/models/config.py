"""ModelConfig: which Stable Diffusion components to build or load. Light: imports no torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from sdray.errors import ConfigError, InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

Preset = Literal["tiny", "sd15"]
COMPONENT_NAMES = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
ARCHITECTURE_PARTS = ("unet", "vae", "text_encoder", "scheduler")
TRAIN_INFO_FILE = "sdray_train.yaml"
"""What `sdray train` and `sdray export` record in a model directory (the run spec, the trained buckets)."""
"""The parts whose constructor config a preset sets and `model.<part>` overrides; a model directory has its own."""


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    preset: Preset = "tiny"
    """Architecture to build with random weights when `path` is empty: `tiny` (tests, demo) or `sd15`."""
    path: str = ""
    """A diffusers-format directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/); wins over `preset` and
    the config file's unet/vae/text_encoder/scheduler overrides (an explicit `--set` that differs from the
    directory's architecture is an error)."""
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


def saved_architecture(path: str, part: str) -> dict[str, Any]:
    """The constructor config of ``part`` saved in the model directory ``path`` (local or s3://).

    Raises:
        InputError: the directory has no such config file.
    """
    import json

    from sdray import storage

    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    uri = storage.join(path, part, name)
    if not storage.exists(uri):
        raise InputError(f"model.path {path}: no {part}/{name}")
    return json.loads(storage.read_bytes(uri))


def architecture(cfg: ModelConfig, part: str) -> dict[str, Any]:
    """The constructor config of ``part`` (one of ARCHITECTURE_PARTS) without building it."""
    if cfg.path:
        return saved_architecture(cfg.path, part)
    from sdray.models.presets import PRESETS

    return {**PRESETS[cfg.preset][part], **getattr(cfg, part)}


def check_model_path(cfg: ModelConfig, parts: Iterable[str] = COMPONENT_NAMES) -> None:
    """Fail fast on a ``model.path`` that is missing or not a diffusers directory (before Ray starts anything).

    Looks only at folder names, so it costs a few stat calls (one listing per part on object storage).
    """
    if not cfg.path:
        return
    from sdray.storage import exists, join

    if not exists(cfg.path):
        raise InputError(f"model.path {cfg.path}: does not exist")
    missing = [f"{name}/" for name in parts if not exists(join(cfg.path, name))]
    if missing:
        raise InputError(
            f"model.path {cfg.path}: not a diffusers model directory (no {', '.join(missing)}); "
            "give the model/ folder of a training run or an export"
        )


def load_part_dir(cfg: ModelConfig, name: str, load: Callable[[str], T]) -> T:
    """``load(directory)`` for part ``name`` of ``cfg.path``, from its local copy (a model on s3:// or gs:// is
    downloaded once); a missing or unreadable folder is an InputError naming the path."""
    from sdray.storage import local_copy

    path = Path(local_copy(cfg.path))
    if not (path / name).is_dir():
        raise InputError(f"model.path {cfg.path}: no {name}/ folder (expected a diffusers-format directory)")
    log.info("loading %s from %s", name, path / name)
    try:
        return load(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"model.path {cfg.path}: cannot load {name}/: {exc}") from exc
