"""The FastAPI app: routes, request limits, auth, and error mapping. No Ray imports but BackPressureError.

`create_api(backend)` builds the app around any object with the `ImageBackend` shape; in Serve that is the
ingress deployment (``sdray.serve.app``), which forwards generation to the batched model deployment.

Errors: validation -> 422 naming the field (FastAPI's ``{"detail": [{"loc": [...], "msg": ...}]}`` shape);
body over ``max_body_bytes`` -> 413, body without Content-Length -> 411; missing or wrong bearer token ->
401; model deployment queue full -> 503 with Retry-After; Serve's ``request_timeout_s`` -> 408.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import time
from dataclasses import replace
from importlib.resources import files
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from sdray.errors import InputError
from sdray.serve.adapters import (
    MULTIPLEX_HEADER,
    AdapterCatalog,
    AdapterChoice,
    check_name,
    from_header,
    from_model_field,
    strip_lora_tags,
)
from sdray.serve.config import ServeConfig
from sdray.serve.request import Generation, GenerationRequest, ModelInfo, check_request
from sdray.serve.schemas import (
    A1111_SAMPLERS,
    FIELD_NAMES,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Txt2ImgRequest,
    Txt2ImgResponse,
    txt2img_response,
)

log = logging.getLogger(__name__)

_PROTECTED_PREFIXES = ("/v1/", "/sdapi/")


class ImageBackend(Protocol):
    """What the routes need: limits, the model's facts, token counting, and generation."""

    cfg: ServeConfig
    api_key: str | None
    adapters: AdapterCatalog

    async def model_info(self) -> ModelInfo: ...

    async def model_health(self) -> str | None: ...

    def count_tokens(self, text: str) -> int: ...

    async def generate(self, req: GenerationRequest) -> Generation: ...


def validation_error(errors: list[tuple[str, str]], api: str) -> JSONResponse:
    """422 in FastAPI's shape, with internal field names mapped to the API's own."""
    names = FIELD_NAMES[api]
    detail = [
        {"loc": ["body", names.get(f, f)], "msg": f"{names.get(f, f)} {msg}", "type": "value_error"}
        for f, msg in errors
    ]
    detail = [d for i, d in enumerate(detail) if d not in detail[:i]]  # width and height are both `size`
    return JSONResponse({"detail": detail}, status_code=422)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


async def _run(
    backend: ImageBackend, gen: GenerationRequest, api: str, response: Response
) -> Generation | JSONResponse:
    """Validate ``gen`` and generate; any failure becomes the HTTP answer a client can act on.

    On success ``response`` gets a ``Server-Timing`` header: ``model`` is the sampler + PNG time of the batch
    in the model replica, ``ingress`` this handler's time (validation, queueing, the model call); what a
    client waits beyond ``ingress`` is the HTTP proxy and the JSON body.
    """
    started = time.perf_counter()
    result = await _validate_and_generate(backend, gen, api)
    if isinstance(result, Generation):
        ingress_ms = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = (
            f'model;dur={result.model_ms:.1f};desc="sampler + PNG, batch of {result.batch_requests}", '
            f'ingress;dur={ingress_ms:.1f};desc="validation, queue, model call"'
        )
    return result


_TIMING_METRIC = re.compile(r"(\w+);dur=([\d.]+)")


def read_server_timing(header: str) -> dict[str, float]:
    """``{"model": ms, "ingress": ms}`` from the ``Server-Timing`` header of a generation (for clients)."""
    return {name: float(ms) for name, ms in _TIMING_METRIC.findall(header)}


async def _validate_and_generate(
    backend: ImageBackend, gen: GenerationRequest, api: str
) -> Generation | JSONResponse:
    errors = check_request(gen, await backend.model_info(), backend.cfg, backend.count_tokens)
    if errors:
        return validation_error(errors, api)
    try:
        return await backend.generate(gen)
    except BackPressureError:
        retry = str(backend.cfg.retry_after_s)
        return _error(503, "server busy: the model queue is full, retry later", {"Retry-After": retry})
    except InputError as exc:  # from the model replica: Ray wraps it, keeping the original as `cause`
        cause = getattr(exc, "cause", None) or exc
        return _error(getattr(cause, "status", 422), str(cause))


DRAIN_LIMIT_BYTES = 64 * 2**20


async def _drain(receive: Receive) -> None:
    """Read and drop a refused body (up to DRAIN_LIMIT_BYTES) before answering.

    A server that answers and closes while the client is still sending resets the connection; clients that
    send the whole body before reading (Python's urllib, requests) then see "connection reset" instead of
    the 413. Past the limit the connection is closed anyway: a client that big gets no answer.
    """
    seen = 0
    while seen <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


class RequestLimits:
    """Auth on the API paths and the body-size limit, before FastAPI parses anything.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) re-wraps every
    request and response in streams, which measured ~3 ms a request on a replica of this 2-core machine.
    """

    def __init__(self, app: ASGIApp, backend: ImageBackend) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await _drain(receive)
        await refusal(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # Serve mounts the app under its route prefix
            path = path[len(root) :]
        if path.startswith(_PROTECTED_PREFIXES) and self.backend.api_key:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token, self.backend.api_key):
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    {"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                return _error(411, "body: a Content-Length header is required")
            if not length.isdigit() or int(length) > self.backend.cfg.max_body_bytes:
                return _error(413, f"body: larger than {self.backend.cfg.max_body_bytes} bytes")
        return None


def create_api(backend: ImageBackend, *, count_rejections: bool = False) -> FastAPI:
    """The HTTP app: web page, health, model card, OpenAI images API, AUTOMATIC1111 txt2img.

    ``count_rejections`` (in a Serve replica): count answers >= 400 in a Ray Serve metric by reason.
    """
    api = FastAPI(
        title="sdray",
        summary="Stable Diffusion text-to-image on Ray Serve",
        description="OpenAI-compatible `/v1/images/generations` and AUTOMATIC1111-compatible "
        "`/sdapi/v1/txt2img`; see docs/serve.md.",
        version="0.1.0",
    )
    api.add_middleware(RequestLimits, backend=backend)
    if count_rejections:
        from sdray.serve.metrics import CountRejections

        api.add_middleware(CountRejections)  # added last = outermost: also sees RequestLimits' refusals
    _add_info_routes(api, backend)
    _add_generation_routes(api, backend)
    return api


def _model_list(info: ModelInfo, cfg: ServeConfig, adapters: list[str]) -> ModelList:
    """The base model's card, then one per adapter (id ``<base>:<adapter>``, parent the base)."""
    card = ModelCard(
        id=info.source,
        native_size=info.native_size,
        size_multiple=info.size_multiple,
        max_tokens=info.max_tokens,
        schedulers=list(info.schedulers),
        buckets=[f"{w}x{h}" for h, w in info.buckets],
        limits={"max_steps": cfg.max_steps, "max_side": cfg.max_side, "max_images": cfg.max_images},
    )
    cards = [card.model_copy(update={"id": f"{info.source}:{a}", "parent": info.source}) for a in adapters]
    return ModelList(data=[card, *cards])


def _choose_adapter(
    backend: ImageBackend, gen: GenerationRequest, choice: AdapterChoice, request: Request, base: str
) -> GenerationRequest | JSONResponse:
    """``gen`` with the adapter the body chose, else the one in Serve's multiplexed-model-id header.

    Unknown adapter: 404 naming the known ones; a bad tag or scale: 422.
    """
    try:
        if not choice.name:
            header = request.headers.get(MULTIPLEX_HEADER) or request.headers.get(
                MULTIPLEX_HEADER.replace("_", "-")  # the form proxies such as nginx forward; Serve takes both
            )
            choice = AdapterChoice(from_header(header, base).name, choice.scale)  # the body's scale
        check_name(choice, backend.adapters)
        return choice.apply(gen)
    except InputError as exc:
        return _error(getattr(exc, "status", 422), str(exc))


def _add_info_routes(api: FastAPI, backend: ImageBackend) -> None:
    page = files("sdray.serve").joinpath("static/index.html").read_text()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @api.get("/healthz")
    async def healthz() -> Any:
        """200 when this HTTP replica and a model replica answer; 503 naming the problem otherwise."""
        problem = await backend.model_health()
        if problem:
            return _error(503, f"model deployment unhealthy: {problem}", {"Retry-After": "5"})
        return {"status": "ok", "model": (await backend.model_info()).source}

    @api.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        """The served model: native size, size multiple, token limit, schedulers and request limits."""
        return _model_list(await backend.model_info(), backend.cfg, list(backend.adapters.adapters))

    @api.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        """The adapter store's listing, AUTOMATIC1111's shape; use one with `<lora:name:weight>` in a prompt."""
        return [
            {"name": name, "alias": name, "path": uri, "metadata": {}}
            for name, uri in backend.adapters.adapters.items()
        ]

    @api.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        """List the adapter store again (adapters added or removed since start)."""
        backend.adapters.refresh()

    @api.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": a, "aliases": [ours], "options": {}} for a, ours in A1111_SAMPLERS.items()]


def _add_generation_routes(api: FastAPI, backend: ImageBackend) -> None:
    @api.post("/v1/images/generations", response_model=ImagesResponse)
    async def images_generations(
        body: ImagesRequest, request: Request, response: Response
    ) -> ImagesResponse | JSONResponse:
        """Text to image, OpenAI images API shape; `data[i].seed` reproduces image i.

        `model: "<base>:<adapter>"` applies a LoRA adapter of the store at `lora_scale` (default 1).
        """
        info = await backend.model_info()
        try:
            chosen = from_model_field(body.model, info.source)
        except InputError as exc:
            return _error(getattr(exc, "status", 422), str(exc))
        choice = AdapterChoice(chosen.name, 1.0 if body.lora_scale is None else body.lora_scale)
        gen = _choose_adapter(backend, body.to_generation(backend.cfg, info), choice, request, info.source)
        if isinstance(gen, JSONResponse):
            return gen
        result = await _run(backend, gen, "openai", response)
        if isinstance(result, JSONResponse):
            return result
        data = [
            ImageData(b64_json=base64.b64encode(png).decode(), seed=seed, revised_prompt=gen.prompt)
            for png, seed in zip(result.pngs, gen.seeds, strict=True)
        ]
        return ImagesResponse(created=int(time.time()), data=data)

    @api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(
        body: Txt2ImgRequest, request: Request, response: Response
    ) -> Txt2ImgResponse | JSONResponse:
        """Text to image, AUTOMATIC1111 API shape; `info` is a JSON string with `all_seeds`.

        A `<lora:name:weight>` tag in the prompt applies that adapter (the tag is removed from the text).
        """
        info = await backend.model_info()
        try:
            prompt, tag = strip_lora_tags(body.prompt)
        except InputError as exc:
            return _error(getattr(exc, "status", 422), str(exc))
        plain = body.to_generation(backend.cfg, info)
        gen = _choose_adapter(
            backend, replace(plain, prompt=prompt), tag or AdapterChoice(), request, info.source
        )
        if isinstance(gen, JSONResponse):
            return gen
        result = await _run(backend, gen, "a1111", response)
        if isinstance(result, JSONResponse):
            return result
        return txt2img_response(body, gen, [base64.b64encode(png).decode() for png in result.pngs])
