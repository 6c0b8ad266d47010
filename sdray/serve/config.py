"""ServeConfig: stage 3 settings (HTTP service, batching, autoscaling, request limits). Light: no torch/ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdray.allocator import Allocator
from sdray.errors import ConfigError

Dtype = Literal["float32", "float16", "bfloat16"]
OffBucket = Literal["refuse", "warn"]
Topology = Literal["split", "single"]
# The sampler's scheduler names (sdray.serve.sampler.SCHEDULERS maps each to a diffusers class).
SCHEDULER_NAMES = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm")


@dataclass(kw_only=True, frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless you mean to expose the service."""
    port: int = 8000
    """HTTP port."""
    topology: Topology = "split"
    """`split`: an HTTP ingress deployment in front of autoscaled model replicas (a handle call between them).
    `single`: one deployment is both (one hop and one process less: lower latency per request); it cannot
    scale to zero (min_replicas >= 1), its replicas scale on all HTTP requests, and an adapter request goes
    to any replica rather than to one that holds the adapter. docs/serve.md compares them."""
    request_timeout_s: float = 300.0
    """Serve's end-to-end HTTP timeout; a request still running after this gets 408."""
    max_batch_size: int = 8
    """Largest number of images per UNet call (1 turns batching off)."""
    batch_wait_timeout_s: float = 0.1
    """How long the first request of a batch waits for company; longer fills batches, adds latency when idle."""
    max_ongoing_requests: int = 16
    """Requests one model replica holds at once (running + waiting for a batch); >= max_batch_size."""
    max_queued_requests: int = 32
    """Requests waiting for a model replica; beyond this the API answers 503 with Retry-After."""
    ingress_max_ongoing_requests: int = 256
    """Requests one ingress (HTTP) replica holds at once; it only awaits the model replicas."""
    retry_after_s: int = 2
    """Retry-After header value (seconds) on 503 answers."""
    min_replicas: int = 1
    """Autoscaling floor of model replicas; 0 scales to zero when idle (first request waits for a cold start)."""
    max_replicas: int = 1
    """Autoscaling ceiling of model replicas."""
    target_ongoing_requests: float = 4.0
    """Autoscaling target: ongoing requests per model replica."""
    upscale_delay_s: float = 10.0
    """Load must stay above target this long before a replica is added."""
    downscale_delay_s: float = 300.0
    """Load must stay below target this long before a replica is removed."""
    downscale_to_zero_delay_s: float | None = None
    """With min_replicas 0: idle time before the last model replica goes (None: downscale_delay_s)."""
    num_gpus: float = 0.0
    """GPUs per model replica (fractions allowed); the sampler runs on CUDA when > 0."""
    num_cpus: float = 1.0
    """CPUs Ray reserves per model replica."""
    allocator: Allocator = "jemalloc"
    """Memory allocator of the model replicas, as `train.allocator`: `jemalloc` (Ray's, kept from returning
    freed memory, so a denoising step does not fault its activations in again) or `system`. The sd15
    sampler's batch at 256 px (2 images, 4 steps) took 14.7 s instead of 21.1 on the 2-core dev VM
    (1.44x, benchmarks/results/batchgen_allocator_sd15_256.md). The ingress never runs the model: it keeps
    the system's."""
    dtype: Dtype = "float32"
    """Weights/activations dtype of the sampler; float16/bfloat16 only with a GPU."""
    max_steps: int = 100
    """Largest `steps` a request may ask for."""
    max_side: int = 1024
    """Largest image width/height in pixels."""
    max_images: int = 4
    """Largest `n` / `batch_size` of one request."""
    max_body_bytes: int = 65536
    """Largest HTTP request body; bigger bodies get 413 before parsing."""
    default_steps: int = 25
    """Denoising steps when a request gives none."""
    default_guidance_scale: float = 7.5
    """Classifier-free guidance scale when a request gives none (<= 1 disables guidance)."""
    default_scheduler: str = "euler"
    """Scheduler when a request gives none: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm."""
    off_bucket: OffBucket = "refuse"
    """A model trained on aspect buckets: `refuse` a size far from every trained bucket (the error lists them)
    or `warn` and generate it anyway. Models without recorded buckets accept any size."""
    bucket_tolerance: float = 0.25
    """Near a trained bucket: aspect ratios within this in log space (0.25 ~ 28%) and areas within 2x."""
    adapters: str | None = None
    """LoRA adapter store: a directory or s3:// prefix with one subdirectory per adapter (docs/serve.md)."""
    max_adapters_per_replica: int = 3
    """Adapters one model replica keeps loaded (Serve multiplexing LRU); more evicts the least recently used."""
    api_key_env: str = "SDRAY_API_KEY"
    """Environment variable holding the bearer token; when it is set (non-empty) the API requires it."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        positive = ("max_batch_size", "max_ongoing_requests", "max_steps", "max_side", "max_images")
        for name in (
            *positive,
            "max_body_bytes",
            "default_steps",
            "max_replicas",
            "max_adapters_per_replica",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}"
            )
        if self.topology == "single" and self.min_replicas < 1:
            raise ConfigError(
                "topology single serves HTTP from the model replicas, so it cannot scale to zero: "
                "set min_replicas >= 1 or topology split"
            )
        if self.dtype != "float32" and self.num_gpus <= 0:
            raise ConfigError(f"dtype {self.dtype} needs a GPU (num_gpus > 0); use float32 on CPU")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps ({self.default_steps}) > max_steps ({self.max_steps})")
        if self.default_scheduler not in SCHEDULER_NAMES:
            raise ConfigError(
                f"default_scheduler {self.default_scheduler!r} unknown; known: {', '.join(SCHEDULER_NAMES)}"
            )
        if self.batch_wait_timeout_s < 0 or self.request_timeout_s <= 0:
            raise ConfigError("batch_wait_timeout_s must be >= 0 and request_timeout_s > 0")
        if self.bucket_tolerance < 0:
            raise ConfigError(f"bucket_tolerance must be >= 0, got {self.bucket_tolerance}")
        if (self.downscale_to_zero_delay_s or 0) < 0:
            raise ConfigError(f"downscale_to_zero_delay_s must be >= 0, got {self.downscale_to_zero_delay_s}")
