"""BatchGenerateConfig: settings of `sdray batch-generate`. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.allocator import Allocator
from sdray.errors import ConfigError
from sdray.serve.config import SCHEDULER_NAMES


@dataclass(kw_only=True, frozen=True)
class BatchGenerateConfig:
    prompts: str = ""
    """Prompt file(s): .parquet, .jsonl or .txt (one prompt a line); a directory of them, or comma-separated."""
    output: str = ""
    """Directory (or s3:// URI) of the image shards (`id`, `image`, `caption` + parameters); resumable."""
    loras: tuple[str, ...] = ()
    """LoRA adapters applied to every sampler, each `DIR` or `DIR:SCALE` (as `sdray generate --lora`)."""
    steps: int = 25
    """Denoising steps of rows that give none."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of rows that give none (<= 1 disables guidance)."""
    scheduler: str = "euler"
    """Sampler scheduler of rows that give none: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm."""
    width: int = 0
    """Image width of rows that give none, pixels; 0 = the model's native size."""
    height: int = 0
    """Image height of rows that give none, pixels; 0 = the model's native size."""
    seed: int = 0
    """Rows without a seed get one derived from this and the row id (stable across runs and resumes)."""
    concurrency: int = 1
    """Sampler actors (each loads the model once); one per GPU on a GPU cluster."""
    batch_size: int = 4
    """Images per UNet call (rows of one size/steps/guidance/scheduler share a call)."""
    num_gpus: float = 1.0
    """GPUs per sampler actor when the cluster has GPUs (ignored on a CPU-only cluster: fp32 on CPU)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves per sampler actor."""
    threads: int = 0
    """Torch threads of a sampler actor on CPU; 0: the machine's cores shared by the sampler actors on it (the
    pool spreads over the cluster's machines)."""
    allocator: Allocator = "jemalloc"
    """Memory allocator of the sampler actors, as `train.allocator`: `jemalloc` (Ray's, kept from returning
    freed memory, so a denoising step does not fault its activations in again) or `system`. On the 2-core dev
    VM the sd15 sampler at 256 px (2 images, 4 steps) took 14.7 s a batch instead of 21.1 (1.44x)
    (benchmarks/results/batchgen_allocator_sd15_256.md)."""
    rows_per_shard: int = 256
    """Images per output parquet shard (at most; a shard never mixes prompt files)."""

    def __post_init__(self) -> None:
        for name in ("steps", "concurrency", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("width", "height", "threads", "num_gpus", "guidance_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_cpus <= 0:
            raise ConfigError(f"num_cpus must be > 0, got {self.num_cpus}")
        if self.scheduler not in SCHEDULER_NAMES:
            raise ConfigError(f"scheduler {self.scheduler!r} unknown; known: {', '.join(SCHEDULER_NAMES)}")
