"""What the demo's stages produce, typed: the run writes these, the report reads them (no import cycle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdray.demo.config import DemoOptions
from sdray.pipeline_config import PipelineConfig

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class DataResult:
    images: int
    """Synthetic images written."""
    held_out: Any
    """The synth config's held-out combinations setting."""


@dataclass(frozen=True)
class VaeResult:
    psnr_db: float
    """Held-out reconstruction PSNR."""
    steps: int
    train_seconds: float
    scaling_factor: float
    """Measured on the data; the latent cache and the UNet use it."""
    history: list[dict[str, float]]
    """One row per report: step, loss, psnr."""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


@dataclass(frozen=True)
class UnetResult:
    steps: int
    model: str
    """The exported diffusers model directory."""
    final_loss: float | None
    history: list[dict[str, float]]
    """One row per step: step, loss, lr."""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


@dataclass(frozen=True)
class GenerateResult:
    images: list[Image.Image]
    prompts: list[tuple[str, Any]]
    """(prompt, target attributes) per image."""


@dataclass
class DemoResults:
    """Per-stage results, filled in run order (None until the stage has run)."""

    data: DataResult | None = None
    vae: VaeResult | None = None
    preprocess: dict[str, Any] | None = None
    """The preprocess summary (`_summary.json`)."""
    unet: UnetResult | None = None
    generate: GenerateResult | None = None
    faithfulness: dict[str, Any] | None = None
    """sdray.evaluate.faithfulness metrics."""


@dataclass
class DemoRun:
    """What the stages produced so far; the report reads it."""

    out: Path
    """The run directory (absolute)."""
    cfg: PipelineConfig
    """The resolved pipeline config (quick overrides applied)."""
    opts: DemoOptions
    """The effective demo options."""
    stage_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage, in run order."""
    results: DemoResults = field(default_factory=DemoResults)
    """Per-stage results."""
    load_avg: dict[str, list[float]] = field(default_factory=dict)
    """1/5/15-minute load averages at the start and the end (the machine may be shared)."""
