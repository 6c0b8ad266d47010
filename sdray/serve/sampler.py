"""The text-to-image sampler: StableDiffusionPipeline's inference path, batch-aware, one seed per image.

A batch of compatible requests (same steps, size, guidance and scheduler: one `bucket`) runs one UNet call
per denoising step, while every image keeps its own `torch.Generator` and its own scheduler instance, so an
image generated in a batch equals the same request generated alone (CPU: within float rounding, ~1e-6).
Schedulers are stateful (step index, multistep history) and not safe to share between concurrent requests,
hence one instance per image, built with ``from_config`` of the model's scheduler config.
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
)
from PIL import Image

from sdray.errors import InputError
from sdray.models.components import SDComponents
from sdray.models.lora import LoraSpec, load_loras
from sdray.serve.config import SCHEDULER_NAMES, ServeConfig
from sdray.serve.request import GenerationRequest, ModelInfo, check_request
from sdray.storage import write_bytes

log = logging.getLogger(__name__)

# name -> (diffusers class, from_config overrides). The names are SCHEDULER_NAMES (config.py, light).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler ``name`` built from the model's scheduler config (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise InputError(f"scheduler: unknown {name!r}; known: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def to_png(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] -> PNG bytes (rounded to uint8 the way diffusers' numpy_to_pil does)."""
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


class Sampler:
    """Wraps ready components (``load_components``) in a diffusers pipeline, with optional LoRA adapters.

    ``loras`` are loaded into the components' own UNet (peft layers added in place, so the components must
    not be shared with another sampler) and applied at their scales to every image.
    """

    def __init__(  # noqa: PLR0913 - keyword-only options
        self,
        components: SDComponents,
        *,
        source: str = "",
        device: str = "cpu",
        dtype: str = "float32",
        loras: Sequence[LoraSpec] = (),
    ) -> None:
        self.pipe = components.pipeline().to(device)
        if dtype != "float32":  # a GPU option (ServeConfig refuses it on CPU)
            self.pipe.to(dtype=_DTYPES[dtype])
        load_loras(self.pipe, list(loras))
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        self.tokenizer = components.tokenizer
        vae_factor = self.pipe.vae_scale_factor
        self.info = ModelInfo(
            source=" + ".join([source or "unknown", *(f"lora {spec}" for spec in loras)]),
            native_size=int(self.pipe.unet.config.sample_size) * vae_factor,
            size_multiple=vae_factor,
            max_tokens=int(self.tokenizer.model_max_length),
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` including the start and end tokens (what must fit in ``max_tokens``)."""
        return len(self.tokenizer(text, truncation=False).input_ids)

    def generate(self, requests: list[GenerationRequest], *, max_batch: int = 8) -> list[list[np.ndarray]]:
        """Images of each request, (H, W, 3) float32 in [0, 1], in seed order.

        Requests are grouped by bucket; each group runs in chunks of at most ``max_batch`` images.
        """
        images: dict[tuple[int, int], np.ndarray] = {}  # (request index, image index) -> image
        jobs = [(r, i) for r, req in enumerate(requests) for i in range(len(req.seeds))]
        jobs.sort(key=lambda job: repr(requests[job[0]].bucket))  # groupby needs sorted keys
        for _, group in groupby(jobs, key=lambda job: repr(requests[job[0]].bucket)):
            group = list(group)
            for start in range(0, len(group), max_batch):
                chunk = group[start : start + max_batch]
                out = self.sample([requests[r] for r, _ in chunk], [requests[r].seeds[i] for r, i in chunk])
                images.update(zip(chunk, out, strict=True))
        return [[images[(r, i)] for i in range(len(req.seeds))] for r, req in enumerate(requests)]

    @torch.inference_mode()
    def sample(self, requests: list[GenerationRequest], seeds: list[int]) -> np.ndarray:
        """One image per (request, seed) pair; all requests share one bucket. Returns (B, H, W, 3) float32."""
        spec = requests[0]
        if any(r.bucket != spec.bucket for r in requests):
            raise ValueError("sample() needs requests of one bucket; use generate()")
        # 1. Encode prompts and negative prompts (negatives only when guidance is on), as diffusers does.
        cfg_on = spec.guidance_scale > 1.0
        cond, uncond = self.pipe.encode_prompt(
            [r.prompt for r in requests],
            self.device,
            1,
            cfg_on,
            [r.negative_prompt for r in requests] if cfg_on else None,
        )
        text = torch.cat([uncond, cond]) if cfg_on else cond  # (2B or B, 77, D)
        # 2. One generator and one scheduler per image: batching must not change any image.
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        schedulers = [make_scheduler(spec.scheduler, self.pipe.scheduler.config) for _ in seeds]
        for scheduler in schedulers:
            scheduler.set_timesteps(spec.steps, device=self.device)
        # 3. Seeded Gaussian latents, drawn per image with shape (1, C, h, w) like prepare_latents.
        latents = torch.cat(
            [self._initial_latents(spec, g, s) for g, s in zip(generators, schedulers, strict=True)]
        )
        # 4. Denoise: one UNet call per step for the whole batch, then each image's own scheduler step.
        for t in schedulers[0].timesteps:
            latents = self._denoise_step(latents, t, text, schedulers, generators, spec.guidance_scale)
        # 5. VAE-decode and map [-1, 1] -> [0, 1] (diffusers' VaeImageProcessor.postprocess).
        decoded = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(decoded, output_type="np")  # (B, H, W, 3)

    def _initial_latents(
        self, spec: GenerationRequest, generator: torch.Generator, scheduler: SchedulerMixin
    ) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, spec.height // factor, spec.width // factor)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=self.pipe.unet.dtype)
        return noise * scheduler.init_noise_sigma  # (1, C, h, w)

    def _denoise_step(  # noqa: PLR0913 - the loop state, kept explicit for readability
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        schedulers: list[SchedulerMixin],
        generators: list[torch.Generator],
        guidance_scale: float,
    ) -> torch.Tensor:
        cfg_on = text.shape[0] == 2 * latents.shape[0]
        scaled = torch.cat(
            [s.scale_model_input(x[None], t) for s, x in zip(schedulers, latents, strict=True)]
        )
        model_input = torch.cat([scaled, scaled]) if cfg_on else scaled  # (2B or B, C, h, w)
        noise = self.pipe.unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]
        if cfg_on:  # classifier-free guidance, https://arxiv.org/abs/2207.12598
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        stepped = [
            s.step(n[None], t, x[None], **_step_kwargs(s, g), return_dict=False)[0]
            for s, g, n, x in zip(schedulers, generators, noise, latents, strict=True)
        ]
        return torch.cat(stepped)  # (B, C, h, w)


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator) -> dict[str, Any]:
    """What StableDiffusionPipeline.prepare_extra_step_kwargs passes: eta=0 (DDIM) and the generator."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def generate_files(sampler: Sampler, req: GenerationRequest, cfg: ServeConfig, out: str | Path) -> list[Path]:
    """`sdray generate`: check ``req``, sample it, write PNGs atomically; returns the paths.

    One image goes to ``out``; several go to ``out`` with ``-0``, ``-1``, ... before the suffix.
    """
    errors = check_request(req, sampler.info, cfg, sampler.count_tokens)
    if errors:
        raise InputError("; ".join(f"{name}: {message}" for name, message in errors))
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must end in .png, got {out}")
    images = sampler.generate([req], max_batch=cfg.max_batch_size)[0]
    paths = [out] if len(images) == 1 else [out.with_stem(f"{out.stem}-{i}") for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        write_bytes(path, to_png(image))
    return paths
