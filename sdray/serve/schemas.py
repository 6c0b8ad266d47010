"""HTTP request/response models: the OpenAI images API and the AUTOMATIC1111 txt2img subset.

Pydantic checks types and hard bounds (FastAPI answers 422 naming the field); limits that depend on the
deployment (max steps, max side, the model's size multiple, token counts) are checked by
``sdray.serve.request.check_request`` and reported under each API's own field names (``FIELD_NAMES``).
Unknown fields are ignored, so clients that send extra options of those APIs keep working.
"""

from __future__ import annotations

import json
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdray.errors import InputError
from sdray.serve.config import SCHEDULER_NAMES, ServeConfig
from sdray.serve.request import MAX_GUIDANCE, GenerationRequest, ModelInfo

SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm"]
assert SchedulerName.__args__ == SCHEDULER_NAMES  # type: ignore[attr-defined]

# AUTOMATIC1111 sampler names -> ours (our own names are accepted too).
A1111_SAMPLERS: dict[str, str] = {
    "DDIM": "ddim",
    "Euler": "euler",
    "Euler a": "euler_a",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "PLMS": "pndm",
}
# One Literal (not a union of two) so a bad value gets one error listing every accepted name.
SamplerName = Literal[
    "DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "PLMS",
    "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm",
]  # fmt: skip
assert SamplerName.__args__ == (*A1111_SAMPLERS, *SCHEDULER_NAMES)  # type: ignore[attr-defined]

MAX_PROMPT_CHARS = 4000  # bounds tokenizer work; the token limit (77 for CLIP) is checked separately
MAX_SEED = 2**32 - 1  # seeds drawn for the client are below this, like A1111's

# Internal field (GenerationRequest / check_request) -> the field name each API uses.
FIELD_NAMES: dict[str, dict[str, str]] = {
    "openai": {"width": "size", "height": "size"},
    "a1111": {"n": "batch_size", "guidance_scale": "cfg_scale", "scheduler": "sampler_name"},
}


def _seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """``count`` consecutive seeds from ``seed``, or from a random one when ``seed`` is None."""
    first = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    return tuple(first + i for i in range(count))


class ImagesRequest(BaseModel):
    """`POST /v1/images/generations` (OpenAI images API) plus sdray's sampling fields."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    n: int = Field(1, ge=1, le=64, description="Number of images (limit: serve.max_images).")
    size: str | None = Field(
        None,
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description="WIDTHxHEIGHT in pixels, multiples of the model's size multiple; default: native size.",
        examples=["512x512"],
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="Only base64 PNG is served.")
    model: str | None = Field(
        None, description="The base model's id, or '<base>:<adapter>' for a LoRA adapter (GET /v1/models)."
    )
    lora_scale: float | None = Field(None, description="Scale of the adapter's update; default 1.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What to steer away from.")
    steps: int | None = Field(
        None, ge=1, le=1000, description="Denoising steps; default serve.default_steps."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE, description="Classifier-free guidance; <= 1 turns it off."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of image 0; image i uses seed + i.")
    scheduler: SchedulerName | None = Field(None, description="Sampler; default serve.default_scheduler.")

    def to_generation(self, cfg: ServeConfig, info: ModelInfo) -> GenerationRequest:
        width, height = (int(v) for v in self.size.split("x")) if self.size else (info.native_size,) * 2
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seeds=_seeds(self.seed, self.n),
            width=width,
            height=height,
            steps=self.steps or cfg.default_steps,
            guidance_scale=cfg.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            scheduler=self.scheduler or cfg.default_scheduler,
        )


def parse_images_request(data: dict) -> ImagesRequest:
    """An ImagesRequest from plain values (the CLI); pydantic's errors become one InputError naming fields."""
    try:
        return ImagesRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(problems) from None


class ImageData(BaseModel):
    b64_json: str = Field(description="The image as base64-encoded PNG.")
    seed: int = Field(description="Seed that reproduces this image.")
    revised_prompt: str = Field(description="The prompt as used (unchanged).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]


class Txt2ImgRequest(BaseModel):
    """`POST /sdapi/v1/txt2img` (AUTOMATIC1111 web UI API, subset)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1, le=1000, description="Default serve.default_steps.")
    cfg_scale: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE, description="Default serve.default_guidance_scale."
    )
    seed: int = Field(-1, ge=-1, lt=2**63, description="-1 draws a random seed; image i uses seed + i.")
    width: int | None = Field(None, ge=1, le=16384, description="Pixels; default: the model's native size.")
    height: int | None = Field(None, ge=1, le=16384, description="Pixels; default: the model's native size.")
    batch_size: int = Field(1, ge=1, le=64, description="Number of images (limit: serve.max_images).")
    sampler_name: SamplerName | None = Field(
        None, description="A1111 sampler name or sdray scheduler name; default serve.default_scheduler."
    )

    def to_generation(self, cfg: ServeConfig, info: ModelInfo) -> GenerationRequest:
        sampler = self.sampler_name or cfg.default_scheduler
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seeds=_seeds(None if self.seed == -1 else self.seed, self.batch_size),
            width=self.width or info.native_size,
            height=self.height or info.native_size,
            steps=self.steps or cfg.default_steps,
            guidance_scale=cfg.default_guidance_scale if self.cfg_scale is None else self.cfg_scale,
            scheduler=A1111_SAMPLERS.get(sampler, sampler),
        )


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNGs.")
    parameters: dict = Field(description="The request as resolved (defaults filled in).")
    info: str = Field(
        description="JSON text: seed, all_seeds, sampler_name, steps, cfg_scale, width, height."
    )


def txt2img_response(req: Txt2ImgRequest, gen: GenerationRequest, images_b64: list[str]) -> Txt2ImgResponse:
    """The A1111 answer: ``parameters`` echoes the resolved request, ``info`` is a JSON string (as A1111's)."""
    sampler = next((a for a, ours in A1111_SAMPLERS.items() if ours == gen.scheduler), gen.scheduler)
    params = {
        **req.model_dump(),
        "seed": gen.seeds[0],
        "steps": gen.steps,
        "cfg_scale": gen.guidance_scale,
        "width": gen.width,
        "height": gen.height,
        "sampler_name": sampler,
    }
    info = {
        "prompt": gen.prompt,
        "negative_prompt": gen.negative_prompt,
        "seed": gen.seeds[0],
        "all_seeds": list(gen.seeds),
        "sampler_name": sampler,
        "steps": gen.steps,
        "cfg_scale": gen.guidance_scale,
        "width": gen.width,
        "height": gen.height,
    }
    return Txt2ImgResponse(images=images_b64, parameters=params, info=json.dumps(info))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "sdray"
    parent: str | None = Field(None, description="For a LoRA adapter: the base model's id.")
    native_size: int = Field(description="Default width and height in pixels.")
    size_multiple: int = Field(description="Width and height must be multiples of this.")
    max_tokens: int = Field(description="Prompt token limit, start and end tokens included.")
    schedulers: list[str]
    buckets: list[str] = Field(
        default_factory=list, description="Trained aspect-ratio buckets as WxH (empty: not recorded)."
    )
    limits: dict[str, int] = Field(description="max_steps, max_side, max_images of this deployment.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
