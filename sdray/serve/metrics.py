"""Custom Ray Serve metrics of the sdray app, exported beside Ray's own on every node's metrics port.

Prometheus names (Ray prefixes `ray_`; counters get `_total`, histograms `_bucket`/`_sum`/`_count`); Serve
adds the tags `deployment`, `replica`, `application`, `route`:

    ray_sdray_images_generated_total{adapter}    images returned (adapter: "base" until LoRA adapters arrive)
    ray_sdray_requests_total{adapter}             generation requests answered by the model deployment
    ray_sdray_batch_size                          requests per sampler batch
    ray_sdray_queue_wait_seconds                  time a request waited in the model replica before its batch ran
    ray_sdray_sampler_step_seconds                sampler time of a batch / its UNet calls (one per denoising step)
    ray_sdray_requests_rejected_total{reason}     HTTP answers >= 400: invalid, unauthorized, too_large, no_length,
                                                  not_found, overloaded, error

docs/serve.md shows how Prometheus scrapes them.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdray.serve.request import GenerationRequest

BASE_MODEL = "base"
"""The `adapter` tag of requests served by the base model (the hook for per-adapter use)."""
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
SECONDS_BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
REJECTION_REASONS = {
    400: "invalid",
    401: "unauthorized",
    411: "no_length",
    413: "too_large",
    404: "not_found",
    422: "invalid",
    503: "overloaded",
}
UNCOUNTED_PATHS = ("/healthz",)  # a probe's 503 is not a refused request


def metrics_url(host: str = "127.0.0.1") -> str:
    """The Prometheus endpoint of this process's Ray node (Ray must be initialised): custom metrics and Ray's."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{host}:{port}/metrics"


def denoising_calls(requests: Sequence[GenerationRequest], max_batch: int) -> int:
    """UNet calls the sampler makes for a batch: per bucket, steps x chunks of at most ``max_batch`` images."""
    images: Tally[tuple] = Tally()
    for req in requests:
        images[req.bucket] += len(req.seeds)
    return sum(bucket[0] * math.ceil(n / max_batch) for bucket, n in images.items())


class ModelMetrics:
    """The model deployment's metrics; create in the replica's ``__init__`` (Ray must be running)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.images = Counter(
            "sdray_images_generated", description="Images generated.", tag_keys=("adapter",)
        )
        self.requests = Counter(
            "sdray_requests", description="Generation requests answered.", tag_keys=("adapter",)
        )
        self.batch_size = Histogram(
            "sdray_batch_size", description="Requests per sampler batch.", boundaries=BATCH_BOUNDARIES
        )
        self.queue_wait = Histogram(
            "sdray_queue_wait_seconds",
            description="Seconds a request waited in the model replica before its batch ran.",
            boundaries=SECONDS_BOUNDARIES,
        )
        self.step_time = Histogram(
            "sdray_sampler_step_seconds",
            description="Sampler seconds per UNet call (denoising step) of a batch.",
            boundaries=SECONDS_BOUNDARIES,
        )

    def record_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampler_s: float,
        max_batch: int,
        adapter: str = BASE_MODEL,
    ) -> None:
        """One finished sampler batch. ``adapter``: the LoRA adapter that served it (per-adapter use)."""
        self.batch_size.observe(len(requests))
        self.images.inc(sum(len(r.seeds) for r in requests), tags={"adapter": adapter})
        self.requests.inc(len(requests), tags={"adapter": adapter})
        calls = denoising_calls(requests, max_batch)
        if calls:
            self.step_time.observe(sampler_s / calls)

    def record_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(max(0.0, seconds))


class CountRejections:
    """ASGI middleware: counts API answers >= 400 by reason (outermost, so it sees every refusal)."""

    def __init__(self, app: ASGIApp) -> None:
        from ray.serve.metrics import Counter

        self.app = app
        self.rejected = Counter(
            "sdray_requests_rejected",
            description="HTTP requests refused, by reason.",
            tag_keys=("reason",),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(UNCOUNTED_PATHS):
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                reason = REJECTION_REASONS.get(message["status"], "error")
                self.rejected.inc(tags={"reason": reason})
            await send(message)

        await self.app(scope, receive, watch)
