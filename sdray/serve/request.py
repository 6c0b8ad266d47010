"""What a generation request is and when it is acceptable. Light (no torch): the HTTP ingress imports it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
        if not info.size_multiple <= side <= cfg.max_side or side % info.size_multiple:
            errors.append(
                (
                    name,
                    f"must be a multiple of {info.size_multiple} in {info.size_multiple}..{cfg.max_side}, "
                    f"got {side}",
                )
            )
    if not 0.0 <= req.guidance_scale <= MAX_GUIDANCE:
        errors.append(("guidance_scale", f"must be in 0..{MAX_GUIDANCE:g}, got {req.guidance_scale}"))
    if req.scheduler not in SCHEDULER_NAMES:
        errors.append(("scheduler", f"unknown {req.scheduler!r}; known: {', '.join(SCHEDULER_NAMES)}"))
    if any(not 0 <= s < 2**63 for s in req.seeds):
        errors.append(("seed", "must be in 0..2**63-1"))
    return errors
