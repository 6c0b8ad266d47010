"""What a generation request is and when it is acceptable. Light (no torch): the HTTP ingress imports it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sdray.serve.buckets import size_problem
from sdray.serve.config import SCHEDULER_NAMES, ServeConfig

MAX_GUIDANCE = 50.0


@dataclass(frozen=True)
class GenerationRequest:
    """One request: ``len(seeds)`` images of one prompt; image i uses seed ``seeds[i]``."""

    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    negative_prompt: str = ""
    adapter: str = ""
    """LoRA adapter of the store (``serve.adapters``) to apply; empty: the base model."""
    adapter_scale: float = 1.0
    """Scale of the adapter's update (1 = as trained)."""

    @property
    def bucket(self) -> tuple[int, int, int, float, str]:
        """Requests with equal buckets can share UNet calls."""
        return (self.steps, self.width, self.height, self.guidance_scale, self.scheduler)


@dataclass(frozen=True)
class Generation:
    """A request's images, and how long the model replica spent on the batch it rode in."""

    pngs: list[bytes]
    model_ms: float
    """Sampler + PNG encoding of the whole batch, in the model replica (Server-Timing ``model``)."""
    batch_requests: int
    """Requests in that batch (this one included)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a client or validator needs to know about the loaded model."""

    source: str
    native_size: int
    size_multiple: int
    max_tokens: int
    schedulers: tuple[str, ...] = field(default=SCHEDULER_NAMES)
    buckets: tuple[tuple[int, int], ...] = ()
    """(height, width) aspect buckets the model was trained on; empty when not recorded."""


FAR_FROM_NATIVE = 2.0
"""A side this many times larger (or smaller) than the model's native size gets a warning."""


def size_warning(req: GenerationRequest, info: ModelInfo) -> str | None:
    """A note when the size is far from what the model was trained at: slow (cost grows with the pixel
    count) and usually poor (repeated or broken composition). None when the size is close to native."""
    ratio = max(req.width, req.height) / info.native_size
    if 1 / FAR_FROM_NATIVE <= ratio <= FAR_FROM_NATIVE:
        return None
    pixels = req.width * req.height / info.native_size**2
    return (
        f"{req.width}x{req.height} is {ratio:g}x the model's native {info.native_size} px per side "
        f"({pixels:g}x the pixels per step): expect it to be slow and to look worse than "
        f"{info.native_size}x{info.native_size}"
    )


def check_request(
    req: GenerationRequest, info: ModelInfo, cfg: ServeConfig, count_tokens: Callable[[str], int]
) -> list[tuple[str, str]]:
    """Every problem with ``req`` as (field, message); empty when it can run. Field names are internal."""
    errors: list[tuple[str, str]] = []
    if not req.prompt.strip():
        errors.append(("prompt", "must not be empty"))
    for name in ("prompt", "negative_prompt"):
        tokens = count_tokens(getattr(req, name))
        if tokens > info.max_tokens:
            errors.append((name, f"is {tokens} tokens; the text encoder takes at most {info.max_tokens}"))
    if not 1 <= len(req.seeds) <= cfg.max_images:
        errors.append(("n", f"must be in 1..{cfg.max_images}, got {len(req.seeds)}"))
    if not 1 <= req.steps <= cfg.max_steps:
        errors.append(("steps", f"must be in 1..{cfg.max_steps}, got {req.steps}"))
    for name in ("width", "height"):
        side = getattr(req, name)
        if not info.size_multiple <= side <= cfg.max_side:  # the size is the problem, whatever its multiple
            errors.append((name, f"must be in {info.size_multiple}..{cfg.max_side} pixels, got {side}"))
        elif side % info.size_multiple:
            errors.append((name, f"must be a multiple of {info.size_multiple}, got {side}"))
    if not any(name in ("width", "height") for name, _ in errors):
        refuse = cfg.off_bucket == "refuse"
        problem = size_problem(
            req.height, req.width, info.buckets, tolerance=cfg.bucket_tolerance, refuse=refuse
        )
        if problem:
            errors.append(("size", problem))
    if not 0.0 <= req.guidance_scale <= MAX_GUIDANCE:
        errors.append(("guidance_scale", f"must be in 0..{MAX_GUIDANCE:g}, got {req.guidance_scale}"))
    if req.scheduler not in SCHEDULER_NAMES:
        errors.append(("scheduler", f"unknown {req.scheduler!r}; known: {', '.join(SCHEDULER_NAMES)}"))
    elif req.scheduler not in info.schedulers:
        errors.append(
            (
                "scheduler",
                f"{req.scheduler!r} cannot keep this model's noise schedule (prediction type, timestep "
                f"spacing, zero terminal SNR); use one of: {', '.join(info.schedulers)}",
            )
        )
    if any(not 0 <= s < 2**63 for s in req.seeds):
        errors.append(("seed", "must be in 0..2**63-1"))
    return errors
