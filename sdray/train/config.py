"""TrainConfig: stage 2 settings. Light: imports no torch or ray."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sdray.allocator import Allocator
from sdray.errors import ConfigError
from sdray.precision import MixedPrecision

PredictionType = Literal["", "epsilon", "v_prediction"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
LoraInit = Literal["gaussian", "default"]
Loader = Literal["auto", "memory", "stream"]


@dataclass(kw_only=True, frozen=True)
class LossConfig:
    """The training objective (`train.loss`): the target, its weighting and the input perturbations.

    Resolved once when a run starts (`resolve`): the run spec, every checkpoint and the exported model carry
    the resolved section, so the loop, validation and export read one fixed objective.
    """

    prediction_type: PredictionType = ""
    """Training target: `epsilon` or `v_prediction`; empty takes the model's scheduler setting when the run
    starts (the resolved value is saved with the run)."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (https://arxiv.org/abs/2303.09556); 5.0 is the paper's value, 0 = off."""
    noise_offset: float = 0.0
    """Std of a per-channel constant added to the noise (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    caption_dropout: float = 0.0
    """Probability of replacing a caption with the stored empty-caption embedding (for classifier-free guidance)."""
    sample_posterior: bool = True
    """Sample latents from the stored VAE posterior (mean + std * noise) when the cache has std."""

    def __post_init__(self) -> None:
        for name in ("snr_gamma", "noise_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"loss.caption_dropout must be in [0, 1), got {self.caption_dropout}")

    def resolve(self, scheduler_config: Mapping[str, Any]) -> LossConfig:
        """This objective for a model whose noise scheduler has ``scheduler_config``.

        An empty `prediction_type` takes the scheduler's. A scheduler with ``rescale_betas_zero_snr`` (zero
        terminal SNR: the last timestep is pure noise) needs v_prediction: there an epsilon prediction says
        nothing about the image.
        """
        target = self.prediction_type or scheduler_config.get("prediction_type", "epsilon")
        if target not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {target!r} is not supported (epsilon, v_prediction)")
        if scheduler_config.get("rescale_betas_zero_snr", False) and target == "epsilon":
            raise ConfigError(
                "prediction_type epsilon cannot be trained on a zero-terminal-SNR schedule "
                "(scheduler rescale_betas_zero_snr: true): use v_prediction"
            )
        return replace(self, prediction_type=target)


@dataclass(kw_only=True, frozen=True)
class LoraConfig:
    """`train.lora`: train low-rank adapters on the UNet (peft) instead of all of its weights."""

    enabled: bool = False
    """Train LoRA adapters only (the UNet's own weights stay frozen); the run exports `<output>/lora`."""
    rank: int = 4
    """Rank r of each adapter (A: r x in, B: out x r); the update is (alpha / r) * B @ A."""
    alpha: float = 0.0
    """LoRA alpha (scale = alpha / rank); 0 means alpha = rank (scale 1), as diffusers' training script."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft lora_dropout)."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that get adapters: a name matches a module whose dotted path ends with it (peft's rule)."""
    init: LoraInit = "gaussian"
    """Adapter init: `gaussian` (A normal with std 1/r, diffusers' choice) or `default` (peft's Kaiming-uniform A);
    B starts at zero either way, so step 0 is the base model."""
    kohya: bool = False
    """Also export `pytorch_lora_weights_kohya.safetensors` (the layout AUTOMATIC1111 and ComfyUI read)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0 (0 = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(self.target_modules):
            raise ConfigError("target_modules must name at least one module (and no empty names)")

    @property
    def scale(self) -> float:
        """alpha / rank: the factor of the adapter's update."""
        return (self.alpha or self.rank) / self.rank


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    data: str = ""
    """Latent cache written by `sdray preprocess` (local directory or s3:// URI)."""
    output: str = ""
    """Run directory (local or s3://): checkpoints, metrics, validation images, exported model."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints; empty means `<output>/ray`."""
    num_workers: int = 1
    """Ray Train workers (DDP processes)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each training worker."""
    torch_threads: int = 1
    """torch intra-op threads per worker; at tiny sizes two 1-thread workers beat one 2-thread worker."""
    batch_size: int = 16
    """Examples per worker per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x grad_accum_steps x num_workers)."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    fused_adamw: bool = True
    """AdamW's fused kernel (`torch.optim.AdamW(fused=True)`, CPU or GPU): one pass over the weights per update
    instead of a loop over parameters. Same algorithm, rounding differences only; the sd15 UNet's update on 2
    CPU cores, clipping included, takes 0.88 s instead of 3.68 s (benchmarks/results/
    cpu_step_speed_sd15_adamw.md). `false`: torch's default (the per-parameter loop on a CPU)."""
    allocator: Allocator = "jemalloc"
    """Memory allocator of the training workers: `jemalloc` (the one inside Ray's wheel), kept from returning
    freed memory to the system, so that a step does not fault its activations and gradients in again: on the
    2-core dev VM the sd15 UNet's step at 256 px took 7.3 s instead of 27.6 s (benchmarks/results/allocator.md);
    `system`: the platform's malloc. A worker keeps its peak memory until it exits. Where Ray ships no
    jemalloc, `jemalloc` logs a warning and runs the system's."""
    lr_schedule: LrSchedule = "constant_with_warmup"
    """diffusers `get_scheduler` name."""
    warmup_steps: int = 0
    """Optimizer steps of linear LR warmup."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still reported)."""
    max_steps: int = 100
    """Optimizer steps to train (a resumed run continues up to this step)."""
    seed: int = 0
    """Seed of noise, timesteps, dropout and data order (>= 0); each stream's seed is derived from it, the
    worker's rank and the stream's purpose (sdray/train/seeds.py)."""
    mixed_precision: MixedPrecision = "auto"
    """Autocast dtype: `auto` = bf16 on GPU, fp32 on CPU; `bf16` on either (on a CPU with native bf16, faster
    for large models); `fp16` on GPU only, with a gradient scaler (sdray/precision.py)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30% slower)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective: prediction target, SNR weighting, noise offset, caption dropout, posterior sampling."""
    ema: bool = True
    """Keep an exponential moving average of the UNet weights (exported and used for validation)."""
    ema_decay: float = 0.9999
    """Largest EMA decay; with warmup the decay grows from 0 toward this."""
    ema_warmup: bool = True
    """EMA warmup (decay = 1 - (1 + step) ** -2/3), so short runs still get a useful average."""
    loader: Loader = "auto"
    """How workers read a square cache. `memory`: each worker reads the whole cache (float16) into its memory
    once and draws batches from a seeded global shuffle per epoch (no Ray Data, no per-epoch re-read, exact
    resume). `stream`: Ray Data streams each worker's share of the files at every epoch (caches larger than
    memory; `materialize` and `shuffle_buffer` apply). `auto`: `memory` when the cache files (with the class
    cache) total at most `memory_loader_max_mb`, else `stream`. A bucketed cache is always read into memory."""
    memory_loader_max_mb: int = 1024
    """`loader: auto` reads caches up to this size (MB of parquet files) into each worker's memory."""
    materialize: bool = False
    """`loader: stream` only: read the cache into Ray's object store once, so later epochs start at once instead
    of re-reading the files (~10 s an epoch for the demo's 136 MB cache); only for caches that fit in memory."""
    shuffle_buffer: int = 256
    """`loader: stream` only: rows in each worker's local shuffle buffer (seeded per epoch); 0 keeps the file
    order."""
    log_every: int = 10
    """Report metrics to Ray Train and append the steps since the last report to the metrics file every this
    many steps (and at every checkpoint); the file keeps every step's row. Each report costs a round trip to
    the Ray Train controller."""
    checkpoint_every: int = 50
    """Write a Ray Train checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the most recent ones)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails (Ray FailureConfig)."""
    validate_every: int = 0
    """Save a validation image grid every this many steps; 0 = only at the end; -1 = never."""
    validation_prompts: tuple[str, ...] = (
        "a large red circle in the top left on a black background",
        "a large blue square in the bottom right on a black background",
    )
    """Prompts of the validation grid (one row each)."""
    validation_seeds: tuple[int, ...] = (0, 1)
    """Seeds of the validation grid (one column each)."""
    validation_steps: int = 20
    """Sampler steps per validation image."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale of the validation images."""
    resolution: int = 0
    """Expected cache resolution in pixels; 0 = the UNet's native size (sample_size x VAE downsample)."""
    class_data: str = ""
    """DreamBooth prior preservation: a latent cache of class images (same encoders as `data`); every batch
    pairs batch_size instance rows with batch_size class rows. Empty = off."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image (prior) MSE next to the instance MSE when `class_data` is set."""
    export: bool = True
    """Export a diffusers model directory to `<output>/model` at the end."""
    export_ema: bool = True
    """Export the EMA weights (else the raw weights)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning (off by default); docs/finetune.md."""

    def __post_init__(self) -> None:
        positive = ("num_workers", "cpus_per_worker", "torch_threads", "batch_size", "grad_accum_steps")
        for name in (*positive, "max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("seed", "max_grad_norm", "warmup_steps", "max_failures", "prior_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (
            self.validate_every < -1
            or min(self.shuffle_buffer, self.resolution, self.memory_loader_max_mb) < 0
        ):
            raise ConfigError(
                "validate_every must be >= -1; shuffle_buffer, resolution, memory_loader_max_mb >= 0"
            )
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ConfigError("mixed_precision fp16 needs use_gpu: true (on a CPU use bf16 or no)")
        if self.validate_every >= 0 and not (self.validation_prompts and self.validation_seeds):
            raise ConfigError(
                "validation needs validation_prompts and validation_seeds (or validate_every: -1)"
            )
