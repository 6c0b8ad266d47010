"""The Serve application, in one of two topologies (`serve.topology`):

    split:  client ──HTTP──► SDIngress (FastAPI: validation, auth, limits) ──handle──► SDModel (@serve.batch)
    single: client ──HTTP──► SDServer (the same FastAPI app and the same batched model in one replica)

`split` (the default) scales model replicas apart from the HTTP front, to zero if asked, and routes adapter
requests to a replica that holds the adapter; `single` saves the handle hop (lower latency per request, one
process fewer). Both run the same code: `ModelReplica` (batching, sampler, adapters) and `Ingress` (the API),
joined by a handle or directly.

`build_app(serve_cfg, model_cfg)` returns the bound application; `app_builder(args)` is the import path a
Serve config file names (pipelines/serve.yaml); `serve_forever(cfg)` is what `sdray serve` runs.
Deployment options (autoscaling, queue limits, CPUs/GPUs) come from ServeConfig; a Serve config file's
`deployments:` section overrides them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import socket
import time
from typing import Any, Protocol

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from sdray import allocator, storage
from sdray.config import from_dict, to_dict
from sdray.errors import InputError, SdrayError
from sdray.models.config import ModelConfig, check_model_path
from sdray.serve.adapters import AdapterCatalog, AdapterChoice, AdapterError
from sdray.serve.api import create_api
from sdray.serve.config import ServeConfig
from sdray.serve.metrics import BASE_MODEL, ModelMetrics, metrics_url
from sdray.serve.request import Generation, GenerationRequest, ModelInfo

log = logging.getLogger(__name__)

APP_NAME = "sdray"
HEALTH_TIMEOUT_S = 10.0


class ModelReplica:
    """Loads the model once; `generate` joins a batch of compatible requests (one UNet call per step)."""

    def __init__(self, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        import torch

        from sdray.models.components import load_components
        from sdray.serve.sampler import Sampler

        self.cfg = from_dict(ServeConfig, serve_cfg, where="serve")
        model = from_dict(ModelConfig, model_cfg, where="model")
        allocator.check_loaded(self.cfg.allocator, "model replica", report=True)
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
        self.metrics = ModelMetrics()
        self._init_adapters()
        log.info("model replica ready: %s, batches of <= %d", self.sampler.info, self.cfg.max_batch_size)

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
        """Batches run, the most requests in one batch, consecutive failed batches, the adapters in the UNet
        with their size, and the memory allocator in use (tests read this)."""
        from sdray.serve.adapters import loaded_adapters, lora_parameters

        return {
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "failures": self.failures,
            "adapters": loaded_adapters(self.sampler.pipe),
            "lora_parameters": lora_parameters(self.sampler.pipe),
            "adapter_loads": self.adapter_loads,
            "allocator": allocator.loaded_allocator(),
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
        The batch hands back one future per request, resolved when that request's bucket is done.
        """
        arrived = time.perf_counter()
        if req.adapter:  # load before batching: an adapter that fails to load fails this request alone
            async with self._unet_lock:
                await self.get_model(req.adapter)
        await self._idle.wait()
        result = await (await self.generate_batch(req))
        self.metrics.record_queue_wait(time.perf_counter() - arrived - result.model_ms / 1000)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[asyncio.Future]:
        log.debug("batch of %d requests, buckets %s", len(requests), {r.bucket for r in requests})
        self._idle.clear()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._running = loop.create_task(self._run_buckets(requests, futures))  # a reference keeps it alive
        return futures

    async def _run_buckets(self, requests: list[GenerationRequest], futures: list[asyncio.Future]) -> None:
        """Cheapest bucket first, each request answered as soon as its bucket is done; a bucket that fails is
        retried request by request, so one bad request fails alone. Only a batch in which every request
        failed counts toward replacing the replica (`check_health`)."""
        start, failed = time.perf_counter(), 0
        try:
            for group in _buckets_by_cost(requests):
                results = await self._run_group([requests[i] for i in group])
                model_ms = (time.perf_counter() - start) * 1000
                for i, result in zip(group, results, strict=True):
                    if futures[i].done():  # its caller went away (cancelled the future)
                        continue
                    if isinstance(result, Exception):
                        failed += not isinstance(
                            result, AdapterError
                        )  # an adapter's fault is not the replica's
                        futures[i].set_exception(result)
                    else:
                        futures[i].set_result(Generation(result, model_ms, len(requests)))
        finally:
            self._idle.set()
            for future in futures:  # only after a bug above: never leave a caller waiting forever
                if not future.done():
                    future.set_exception(RuntimeError("the batch stopped before this request ran"))
        self.failures = self.failures + 1 if failed == len(requests) else 0
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(requests))

    async def _run_group(self, group: list[GenerationRequest]) -> list[list[bytes] | Exception]:
        """PNGs of each request of one bucket (one adapter and scale), in a thread: the event loop keeps
        accepting requests. The UNet lock keeps the adapter loaded and active for the whole run."""
        choice = AdapterChoice(group[0].adapter, group[0].adapter_scale)
        try:
            async with self._unet_lock:
                if choice.name:  # (re)loads it if a request for another adapter evicted it meanwhile
                    await self.get_model(choice.name)
                start = time.perf_counter()
                pngs = await asyncio.to_thread(self._pngs, group, choice)
            self.metrics.record_batch(  # per UNet group: one adapter, one shape; failed requests not counted
                group,
                sampler_s=time.perf_counter() - start,
                max_batch=self.cfg.max_batch_size,
                adapter=choice.name or BASE_MODEL,
            )
            return pngs
        except AdapterError as exc:  # the adapter's fault: every request that asked for it
            return [exc] * len(group)
        except Exception as exc:  # handed to the caller(s)
            if len(group) == 1:
                log.warning("request failed in the sampler: %s", exc)
                return [exc]
        return [(await self._run_group([req]))[0] for req in group]  # isolate the request at fault

    def _pngs(self, group: list[GenerationRequest], choice: AdapterChoice) -> list[list[bytes]]:
        from sdray.serve.adapters import activate
        from sdray.serve.sampler import to_png

        activate(self.sampler.pipe, choice)
        images = self.sampler.generate(group, max_batch=self.cfg.max_batch_size)
        return [[to_png(image) for image in per_request] for per_request in images]


def _buckets_by_cost(requests: list[GenerationRequest]) -> list[list[int]]:
    """Request indices grouped by bucket, cheapest bucket (steps x pixels x images) first."""
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault((req.bucket, req.adapter, req.adapter_scale), []).append(i)  # never mix adapters

    def cost(group: list[int]) -> int:
        first = requests[group[0]]
        return first.steps * first.width * first.height * sum(len(requests[i].seeds) for i in group)

    return sorted(groups.values(), key=cost)


SDModel = serve.deployment(name="SDModel")(ModelReplica)


class ModelClient(Protocol):
    """How the API reaches the model: through a deployment handle (split) or in the same replica (single)."""

    async def info(self) -> ModelInfo: ...

    async def health(self) -> None: ...

    async def generate(self, req: GenerationRequest) -> Generation: ...


class HandleModel:
    """The model deployment behind a handle; an adapter request goes to a replica that holds the adapter."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def info(self) -> ModelInfo:
        return await self.handle.info.remote()

    async def health(self) -> None:
        await self.handle.health.remote()

    async def generate(self, req: GenerationRequest) -> Generation:
        if req.adapter:  # Serve routes to a replica that holds the adapter, when one does
            return await self.handle.generate.options(multiplexed_model_id=req.adapter).remote(req)
        return await self.handle.generate.remote(req)


class LocalModel:
    """The model in this replica. Holds at most ``limit`` generations (running or waiting for a batch) and
    refuses more with BackPressureError (503 with Retry-After), as the model deployment's queue does."""

    def __init__(self, replica: ModelReplica, limit: int) -> None:
        self.replica, self.limit, self.in_flight = replica, limit, 0

    async def info(self) -> ModelInfo:
        return self.replica.info()

    async def health(self) -> None:
        self.replica.health()

    async def generate(self, req: GenerationRequest) -> Generation:
        if self.in_flight >= self.limit:
            raise BackPressureError(num_queued_requests=self.in_flight, max_queued_requests=self.limit)
        self.in_flight += 1
        try:
            return await self.replica.generate(req)
        finally:
            self.in_flight -= 1


class Ingress:
    """The HTTP API's backend (sdray.serve.api.ImageBackend): validates, authenticates and hands generation to
    the model; holds only the tokenizer."""

    def __init__(self, model: ModelClient, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        from sdray.models.tokenizer import load_tokenizer

        self.cfg = from_dict(ServeConfig, serve_cfg, where="serve")
        self.model = model
        self.tokenizer = load_tokenizer(from_dict(ModelConfig, model_cfg, where="model"))
        self.api_key = os.environ.get(self.cfg.api_key_env) or None
        self.adapters = AdapterCatalog(self.cfg.adapters)
        self._info: ModelInfo | None = None

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self, count_rejections=True)

    async def model_info(self) -> ModelInfo:
        if self._info is None:  # asked lazily: with min_replicas=0 no model replica runs at start
            self._info = await self.model.info()
        return self._info

    async def model_health(self) -> str | None:
        try:
            await asyncio.wait_for(self.model.health(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # any failure to answer is "unhealthy"; the message says which
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    async def generate(self, req: GenerationRequest) -> Generation:
        return await self.model.generate(req)


@serve.deployment(name="SDIngress")
@serve.ingress()
class SDIngress(Ingress):
    """The HTTP front of the split topology, in front of SDModel's replicas."""

    def __init__(self, model: DeploymentHandle, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        super().__init__(HandleModel(model), serve_cfg, model_cfg)


@serve.deployment(name="SDServer")
@serve.ingress()
class SDServer(Ingress):
    """The single topology: the HTTP API and the batched model in one replica."""

    def __init__(self, serve_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        self.replica = ModelReplica(serve_cfg, model_cfg)
        limit = self.replica.cfg.max_ongoing_requests + self.replica.cfg.max_queued_requests
        super().__init__(LocalModel(self.replica, limit), serve_cfg, model_cfg)

    def check_health(self) -> None:
        self.replica.check_health()

    def stats(self) -> dict[str, Any]:
        return self.replica.stats()


def build_app(
    serve_cfg: ServeConfig, model_cfg: ModelConfig, *, api_key: str | None = None
) -> serve.Application:
    """The bound application, deployment options taken from ``serve_cfg``.

    ``api_key``, when given, reaches the ingress replicas as ``serve_cfg.api_key_env`` in their runtime_env;
    otherwise they read that variable from their own environment (e.g. set on the cluster's nodes).
    """
    s, m = to_dict(serve_cfg), to_dict(model_cfg)
    api_key_env = {serve_cfg.api_key_env: api_key} if api_key else {}
    model_env = allocator.worker_env(serve_cfg.allocator)
    autoscaling = {
        "min_replicas": serve_cfg.min_replicas,
        "max_replicas": serve_cfg.max_replicas,
        "initial_replicas": max(serve_cfg.min_replicas, 1),
        "target_ongoing_requests": serve_cfg.target_ongoing_requests,
        "upscale_delay_s": serve_cfg.upscale_delay_s,
        "downscale_delay_s": serve_cfg.downscale_delay_s,
        "downscale_to_zero_delay_s": serve_cfg.downscale_to_zero_delay_s,
    }
    model_resources = {"num_cpus": serve_cfg.num_cpus, "num_gpus": serve_cfg.num_gpus}
    if (
        serve_cfg.topology == "single"
    ):  # HTTP requests of every kind reach this replica; LocalModel bounds generations
        return SDServer.options(
            autoscaling_config=autoscaling,
            max_ongoing_requests=serve_cfg.ingress_max_ongoing_requests,
            ray_actor_options={**model_resources, **_env_vars(model_env | api_key_env)},
        ).bind(s, m)
    model = SDModel.options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=serve_cfg.max_ongoing_requests,
        max_queued_requests=serve_cfg.max_queued_requests,
        ray_actor_options={**model_resources, **_env_vars(model_env)},
    ).bind(s, m)
    ingress = SDIngress.options(
        max_ongoing_requests=serve_cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, **_env_vars(api_key_env)},
    )
    return ingress.bind(model, s, m)


def _env_vars(env: dict[str, str]) -> dict[str, Any]:
    """Ray actor options that start a replica with ``env`` (none where it is empty: the replica may then
    reuse a worker process Ray already started)."""
    return {"runtime_env": {"env_vars": env}} if env else {}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry for Serve config files: ``args: {config: tiny, overrides: ["model.path=..."]}``."""
    from sdray.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(args.get("config", "tiny"), list(args.get("overrides", [])))
    return build_app(cfg.serve, cfg.model)


class ServeStartError(SdrayError):
    """The model or HTTP deployment could not start; the message is the replica's own error, in one line."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds, before Serve starts its proxy (which would only log the clash)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"serve.port {port} on {host}: cannot listen ({exc.strerror}); choose another with --port"
            ) from None


def check_inputs(serve_cfg: ServeConfig, model_cfg: ModelConfig) -> None:
    """What `sdray serve` can check before starting anything: the model directory and the port."""
    check_model_path(model_cfg)
    check_port_free(serve_cfg.host, serve_cfg.port)


def _replica_error(exc: Exception) -> str:
    """The last ``SomeError: message`` line of a failed deployment's report (the replica's traceback)."""
    lines = re.findall(r"^\s*((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$", str(exc), re.MULTILINE)
    reason = lines[-1] if lines else str(exc).strip().splitlines()[0]
    return re.sub(r"^(?:[\w.]+\.)?(InputError|ConfigError): ", "", reason.strip())


class _AlreadyAppliedFilter(logging.Filter):
    """Drop Serve's "New http_options ... will not be applied" note: serve.run() re-checks the instance that
    `start` configured a moment earlier, with no options of its own, so the options were applied."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def start(serve_cfg: ServeConfig, model_cfg: ModelConfig, *, api_key: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the app (Ray must be initialised); returns the URL.

    ``api_key`` defaults to the ``serve_cfg.api_key_env`` variable of this process's environment. A replica
    that fails to start raises ServeStartError carrying its own error line.
    """
    api_key = api_key or os.environ.get(serve_cfg.api_key_env) or None
    logging.getLogger("ray.serve").addFilter(_AlreadyAppliedFilter())
    serve.start(
        http_options={
            "host": serve_cfg.host,
            "port": serve_cfg.port,
            "request_timeout_s": serve_cfg.request_timeout_s,
        }
    )
    try:
        serve.run(
            build_app(serve_cfg, model_cfg, api_key=api_key), name=APP_NAME, route_prefix="/", blocking=False
        )
    except RuntimeError as exc:  # Serve's "Deploying application sdray failed" with every replica traceback
        log.debug("deployment failed: %s", exc)
        raise ServeStartError(f"the model service failed to start: {_replica_error(exc)}") from None
    return f"http://{serve_cfg.host}:{serve_cfg.port}/"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(serve_cfg: ServeConfig, model_cfg: ModelConfig, *, ready: Any = None) -> None:
    """`sdray serve`: start Ray (local, or the cluster in RAY_ADDRESS), deploy, block until interrupted.

    The model directory and the port are checked first: a mistake costs a second, not a Ray start-up and
    a replica's retries.
    """
    import ray

    from sdray.cluster import ensure_ray

    # Replicas may run in another working directory (a Ray cluster the command attached to): absolute paths.
    if model_cfg.path:
        model_cfg = dataclasses.replace(model_cfg, path=storage.absolute(model_cfg.path))
    if serve_cfg.adapters:
        serve_cfg = dataclasses.replace(serve_cfg, adapters=storage.absolute(serve_cfg.adapters))
    check_inputs(serve_cfg, model_cfg)

    # ray.init installs a SIGTERM handler that aborts the process; stop cleanly (Serve shut down) instead.
    signal.signal(signal.SIGTERM, _interrupt)
    ensure_ray()  # keeps the handler above
    try:
        url = start(serve_cfg, model_cfg)
        log.info("Prometheus metrics of this node: %s (see docs/serve.md)", metrics_url())
        if ready is not None:
            ready(url)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
