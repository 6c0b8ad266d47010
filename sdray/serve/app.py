"""The Serve application: an HTTP ingress deployment and a batched model deployment, composed with handles.

    client ──HTTP──► SDIngress (FastAPI: validation, auth, limits) ──handle──► SDModel (@serve.batch, sampler)

`build_app(serve_cfg, model_cfg)` returns the bound application; `app_builder(args)` is the import path a
Serve config file names (pipelines/serve.yaml); `serve_forever(cfg)` is what `sdray serve` runs.
Deployment options (autoscaling, queue limits, CPUs/GPUs) come from ServeConfig; a Serve config file's
`deployments:` section overrides them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from sdray.config import from_dict, to_dict
from sdray.models.config import ModelConfig
from sdray.serve.adapters import AdapterCatalog, AdapterChoice, AdapterError
from sdray.serve.api import create_api
from sdray.serve.config import ServeConfig
from sdray.serve.request import Generation, GenerationRequest, ModelInfo

log = logging.getLogger(__name__)

APP_NAME = "sdray"
HEALTH_TIMEOUT_S = 10.0


@serve.deployment(name="SDModel")
class SDModel:
    """Loads the model once; `generate` joins a batch of compatible requests (one UNet call per step)."""

    def __init__(self, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        import torch

        from sdray.models.components import load_components
        from sdray.serve.sampler import Sampler

        self.cfg = from_dict(ServeConfig, serve_cfg, where="serve")
        model = from_dict(ModelConfig, model_cfg, where="model")
        use_cuda = self.cfg.num_gpus > 0 and torch.cuda.is_available()
        if not use_cuda:
            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        self.sampler = Sampler(
            load_components(model),
            source=model.source,
            device="cuda" if use_cuda else "cpu",
            dtype=self.cfg.dtype,
        )
        self.generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._idle = asyncio.Event()  # set while no batch runs (see `generate`)
        self._idle.set()
        self.failures = 0
        self.batches = 0
        self.largest_batch = 0
        self._init_adapters()
        log.info("SDModel ready: %s, batches of <= %d", self.sampler.info, self.cfg.max_batch_size)

    def _init_adapters(self) -> None:
        """LoRA adapters from the store, loaded on first use and evicted LRU by Serve's model multiplexing."""
        from sdray.serve.adapters import LoadedAdapter

        self.catalog = AdapterCatalog(self.cfg.adapters)
        # Every call into the multiplex LRU (load, and the eviction it may do first) and every UNet run hold
        # this lock: an adapter is never added to or deleted from the UNet while a batch uses it.
        self._unet_lock = asyncio.Lock()
        self.adapter_loads = 0

        async def load(model_id: str) -> LoadedAdapter:
            uri = self.catalog.uri(model_id)
            self.adapter_loads += 1
            return await asyncio.to_thread(LoadedAdapter, self.sampler.pipe, model_id, uri)

        # Set up here rather than as a decorated method: the LRU size is a config value. Serve detects a
        # multiplexed function stored on the instance (ray.serve._private.utils._callable_uses_multiplexing).
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load)

    def info(self) -> ModelInfo:
        return self.sampler.info

    def health(self) -> str:
        return "ok"

    def stats(self) -> dict[str, Any]:
        """Batches run, the most requests in one batch, the adapters in the UNet and their size (tests read this)."""
        from sdray.serve.adapters import loaded_adapters, lora_parameters

        return {
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "adapters": loaded_adapters(self.sampler.pipe),
            "lora_parameters": lora_parameters(self.sampler.pipe),
            "adapter_loads": self.adapter_loads,
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self.failures >= 3:
            raise RuntimeError(f"{self.failures} consecutive batches failed")

    async def generate(self, req: GenerationRequest) -> Generation:
        """The images of ``req`` (validated by the ingress) as PNG bytes, with the batch's timing.

        Requests wait at this door while a batch runs. Serve forms the next batch while the previous one is
        still running (ray/serve/batching.py `_process_batches`), so without the door a batch closes after
        `batch_wait_timeout_s` with whoever came by then, and a busy replica alternates half-full batches.
        """
        model_id = serve.get_multiplexed_model_id()
        if model_id:  # load before batching: an adapter that fails to load fails this request alone
            async with self._unet_lock:
                await self.get_model(model_id)
        await self._idle.wait()
        return await self.generate_batch(req)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        from sdray.serve.sampler import to_png

        log.debug("batch of %d requests, buckets %s", len(requests), {r.bucket for r in requests})
        self._idle.clear()
        start = time.perf_counter()
        try:
            images = await self._generate_by_adapter(requests)
        except AdapterError:  # an adapter's problem, not the replica's: not counted against its health
            raise
        except Exception:
            self.failures += 1
            raise
        finally:
            self._idle.set()
        self.failures = 0
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        pngs = [[to_png(image) for image in per_request] for per_request in images]
        model_ms = (time.perf_counter() - start) * 1000
        return [Generation(p, model_ms, len(requests)) for p in pngs]

    async def _generate_by_adapter(self, requests: list[GenerationRequest]) -> list[Any]:
        """The sampler's images, one UNet run per (adapter, scale) group: a batch never mixes adapters."""
        from sdray.serve.adapters import activate

        groups: dict[AdapterChoice, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(AdapterChoice(r.adapter, r.adapter_scale), []).append(i)
        images: list[Any] = [None] * len(requests)
        for choice, indices in groups.items():
            async with self._unet_lock:
                if choice.name:  # (re)loads it if a request for another adapter evicted it meanwhile
                    await self.get_model(choice.name)

                def run(choice: AdapterChoice = choice, indices: list[int] = indices) -> list[Any]:
                    activate(self.sampler.pipe, choice)
                    group = [requests[i] for i in indices]
                    return self.sampler.generate(group, max_batch=self.cfg.max_batch_size)

                # in a thread: the event loop keeps accepting requests for the next batch meanwhile
                for i, result in zip(indices, await asyncio.to_thread(run), strict=True):
                    images[i] = result
        return images


@serve.deployment(name="SDIngress")
@serve.ingress()
class SDIngress:
    """HTTP front: validates, authenticates and forwards to SDModel; holds only the tokenizer."""

    def __init__(self, model: DeploymentHandle, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        from sdray.models.components import load_components

        self.cfg = from_dict(ServeConfig, serve_cfg, where="serve")
        self.model = model
        self.tokenizer = load_components(
            from_dict(ModelConfig, model_cfg, where="model"), ["tokenizer"]
        ).tokenizer
        self.api_key = os.environ.get(self.cfg.api_key_env) or None
        self.adapters = AdapterCatalog(self.cfg.adapters)
        self._info: ModelInfo | None = None

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self)

    async def model_info(self) -> ModelInfo:
        if self._info is None:  # asked lazily: with min_replicas=0 no model replica runs at start
            self._info = await self.model.info.remote()
        return self._info

    async def model_health(self) -> str | None:
        try:
            await asyncio.wait_for(self.model.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # any failure to answer is "unhealthy"; the message says which
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    async def generate(self, req: GenerationRequest) -> Generation:
        if req.adapter:  # Serve routes to a replica that holds the adapter, when one does
            return await self.model.generate.options(multiplexed_model_id=req.adapter).remote(req)
        return await self.model.generate.remote(req)


def build_app(
    serve_cfg: ServeConfig, model_cfg: ModelConfig, *, api_key: str | None = None
) -> serve.Application:
    """The bound application, deployment options taken from ``serve_cfg``.

    ``api_key``, when given, reaches the ingress replicas as ``serve_cfg.api_key_env`` in their runtime_env;
    otherwise they read that variable from their own environment (e.g. set on the cluster's nodes).
    """
    s, m = to_dict(serve_cfg), to_dict(model_cfg)
    ingress_options: dict[str, Any] = {"num_cpus": 0}
    if api_key:
        ingress_options["runtime_env"] = {"env_vars": {serve_cfg.api_key_env: api_key}}
    model = SDModel.options(
        autoscaling_config={
            "min_replicas": serve_cfg.min_replicas,
            "max_replicas": serve_cfg.max_replicas,
            "initial_replicas": max(serve_cfg.min_replicas, 1),
            "target_ongoing_requests": serve_cfg.target_ongoing_requests,
            "upscale_delay_s": serve_cfg.upscale_delay_s,
            "downscale_delay_s": serve_cfg.downscale_delay_s,
            "downscale_to_zero_delay_s": serve_cfg.downscale_to_zero_delay_s,
        },
        max_ongoing_requests=serve_cfg.max_ongoing_requests,
        max_queued_requests=serve_cfg.max_queued_requests,
        ray_actor_options={"num_cpus": serve_cfg.num_cpus, "num_gpus": serve_cfg.num_gpus},
    ).bind(s, m)
    ingress = SDIngress.options(
        max_ongoing_requests=serve_cfg.ingress_max_ongoing_requests,
        ray_actor_options=ingress_options,
    )
    return ingress.bind(model, s, m)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry for Serve config files: ``args: {config: tiny, overrides: ["model.path=..."]}``."""
    from sdray.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(args.get("config", "tiny"), list(args.get("overrides", [])))
    return build_app(cfg.serve, cfg.model)


def start(serve_cfg: ServeConfig, model_cfg: ModelConfig, *, api_key: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the app (Ray must be initialised); returns the URL.

    ``api_key`` defaults to the ``serve_cfg.api_key_env`` variable of this process's environment.
    """
    api_key = api_key or os.environ.get(serve_cfg.api_key_env) or None
    serve.start(
        http_options={
            "host": serve_cfg.host,
            "port": serve_cfg.port,
            "request_timeout_s": serve_cfg.request_timeout_s,
        }
    )
    serve.run(
        build_app(serve_cfg, model_cfg, api_key=api_key), name=APP_NAME, route_prefix="/", blocking=False
    )
    return f"http://{serve_cfg.host}:{serve_cfg.port}/"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(serve_cfg: ServeConfig, model_cfg: ModelConfig, *, ready: Any = None) -> None:
    """`sdray serve`: start Ray (local, or the cluster in RAY_ADDRESS), deploy, block until interrupted."""
    import ray

    from sdray.cluster import ensure_ray

    # ray.init installs a SIGTERM handler that aborts the process; stop cleanly (Serve shut down) instead.
    signal.signal(signal.SIGTERM, _interrupt)
    ensure_ray()  # keeps the handler above
    try:
        url = start(serve_cfg, model_cfg)
        if ready is not None:
            ready(url)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
