"""Validation image grids: fixed prompts x fixed seeds through the full diffusers sampler, with EMA weights.

Besides export, the only module of the training package that loads the VAE and the text encoder (they are
needed to sample images; training itself reads cached latents).
"""

from __future__ import annotations

import copy
import io
import logging

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image

from sdray import storage
from sdray.models.components import SDComponents, load_components
from sdray.models.config import ModelConfig
from sdray.train.config import TrainConfig

log = logging.getLogger(__name__)

FROZEN_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")


def ema_unet(unet: UNet2DConditionModel, ema: EMAModel | None) -> UNet2DConditionModel:
    """A copy of ``unet`` in eval mode and fp32 holding the EMA weights (the raw weights when there is no EMA).

    The EMA covers the parameters that train (all, or a LoRA adapter's), matched by name in the copy.
    """
    trained = {name for name, p in unet.named_parameters() if p.requires_grad}
    copy_ = copy.deepcopy(unet).float().eval()  # a LoRA run's frozen weights may be half precision
    if ema is not None:
        ema.copy_to([p for name, p in copy_.named_parameters() if name in trained])
    return copy_


class Validator:
    """Loads the frozen components once (rank 0 only) and renders a grid per call."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, prediction_type: str, device: torch.device):
        self.cfg = cfg
        self.device = device
        parts = load_components(model_cfg, FROZEN_PARTS)
        parts.text_encoder.to(device)
        parts.vae.to(device)
        # DDIM samples well in few steps; the prediction type must match what the UNet is trained on.
        parts.scheduler = DDIMScheduler.from_config(parts.scheduler.config, prediction_type=prediction_type)
        self.frozen = parts

    @torch.inference_mode()
    def grid(self, unet: UNet2DConditionModel, ema: EMAModel | None, resolution: int) -> Image.Image:
        """A (prompts x seeds) grid of ``resolution``-pixel images sampled with the EMA weights."""
        components = SDComponents(
            **{p: getattr(self.frozen, p) for p in FROZEN_PARTS}, unet=ema_unet(unet, ema)
        )
        pipe = components.pipeline()
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for prompt in self.cfg.validation_prompts:
            generators = [torch.Generator("cpu").manual_seed(s) for s in self.cfg.validation_seeds]
            out = pipe(
                prompt=prompt,
                num_images_per_prompt=len(generators),
                generator=generators,
                num_inference_steps=self.cfg.validation_steps,
                guidance_scale=self.cfg.guidance_scale,
                height=resolution,
                width=resolution,
            )
            rows.append(out.images)
        canvas = Image.new("RGB", (resolution * len(rows[0]), resolution * len(rows)))
        for r, images in enumerate(rows):
            for c, image in enumerate(images):
                canvas.paste(image, (c * resolution, r * resolution))
        return canvas

    def save(
        self, unet: UNet2DConditionModel, ema: EMAModel | None, *, step: int, run_uri: str, resolution: int
    ) -> str:
        buffer = io.BytesIO()
        self.grid(unet, ema, resolution).save(buffer, format="PNG")
        uri = storage.join(run_uri, "validation", f"step-{step:08d}.png")
        storage.write_bytes(uri, buffer.getvalue())
        log.info("validation grid at step %d: %s", step, uri)
        return uri
