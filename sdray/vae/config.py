"""VaeTrainConfig: settings of `sdray train-vae`. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdray.allocator import Allocator
from sdray.errors import ConfigError
from sdray.precision import MixedPrecision


@dataclass(kw_only=True, frozen=True)
class VaeTrainConfig:
    data: str = ""
    """Image-caption parquet (file, directory or s3:// URI), the same input as `sdray preprocess`."""
    output: str = ""
    """Run directory: vae/ (diffusers format), metrics.json, config.yaml, Ray Train checkpoints."""
    image_column: str = "image"
    """Column with image bytes or the {bytes, path} struct."""
    id_column: str = "id"
    """Column with a unique row id; its hash picks the held-out images."""
    resolution: int = 64
    """Side of the square center crop the VAE is trained on, pixels."""
    holdout_fraction: float = 0.02
    """Fraction of rows (by id hash) kept out of training for the reconstruction PSNR."""
    max_eval_images: int = 256
    """At most this many held-out images are reconstructed per evaluation."""
    num_workers: int = 1
    """Ray Train workers (DDP processes)."""
    threads_per_worker: int = 1
    """torch threads per worker; small models run faster as several 1-thread workers than one wide one."""
    use_gpu: bool = False
    """One GPU per worker."""
    mixed_precision: MixedPrecision = "auto"
    """Autocast dtype of the training step: `auto` = bf16 on GPU, fp32 on CPU; `bf16` on either (1.5x on the
    demo's VAE step on a CPU with native bf16); fp16 is refused (no gradient scaler). Evaluation runs in fp32."""
    allocator: Allocator = "jemalloc"
    """Memory allocator of the training workers, as `train.allocator`: `jemalloc` (Ray's, kept from returning
    freed memory) or `system`."""
    batch_size: int = 16
    """Images per worker per step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (from scratch ~2e-3 for small VAEs; fine-tuning a real VAE ~1e-5)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after the warmup."""
    lr_warmup_steps: int = 50
    """Linear warmup steps."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    target_psnr: float = 0.0
    """Stop early once held-out PSNR reaches this many dB (0: always train max_steps)."""
    l1_weight: float = 1.0
    """Weight of the mean absolute reconstruction error."""
    mse_weight: float = 1.0
    """Weight of the mean squared reconstruction error."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence of the posterior to N(0, 1) (summed over latent elements)."""
    foreground_weight: float = 1.0
    """Reconstruction weight of foreground pixels (far from the image's border colour) relative to the rest;
    >1 helps small objects on plain backgrounds, 1 for photographs."""
    foreground_threshold: float = 0.1
    """A pixel is foreground when a channel differs from the border colour by more than this (0-1 scale)."""
    report_every: int = 100
    """Steps between held-out evaluations, checkpoints and metric reports."""
    scaling_images: int = 512
    """Training images encoded at export to set scaling_factor = 1 / std(latents); 0 keeps the model's."""
    materialize: bool = True
    """Decode images once and keep them (uint8) in the object store; false re-decodes every epoch (large
    data sets)."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    seed: int = 0
    """Seed of the posterior sampling and the data order."""

    def __post_init__(self) -> None:
        if self.resolution % 8 or self.resolution <= 0:
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        positive = ("num_workers", "threads_per_worker", "batch_size", "max_steps", "report_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 is not supported for the VAE (use bf16, auto or no)")
        if self.learning_rate <= 0 or self.max_eval_images < 1:
            raise ConfigError("learning_rate must be > 0 and max_eval_images >= 1")
        for name in (
            "l1_weight",
            "mse_weight",
            "kl_weight",
            "lr_warmup_steps",
            "scaling_images",
            "max_failures",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight == self.mse_weight == 0:
            raise ConfigError("l1_weight and mse_weight are both 0: nothing to learn")
        if self.foreground_weight < 1.0:
            raise ConfigError(f"foreground_weight must be >= 1, got {self.foreground_weight}")
