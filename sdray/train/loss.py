"""The denoising objective on cached latents: pure functions of the UNet, the noise scheduler and a batch.

Randomness is explicit: `prepare_batch` and `draw_noise` take a torch.Generator, and `diffusion_loss` takes
the drawn noise and timesteps, so a test can fix them and recompute the formula independently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from sdray.data import cache
from sdray.train.config import LossConfig


@dataclass(frozen=True)
class CachedBatch:
    """What the UNet trains on, on the training device."""

    latents: torch.Tensor
    """(B, C, h, w) float32, already multiplied by the VAE scaling factor."""
    text_embeds: torch.Tensor
    """(B, 77, D) float32 conditioning, with dropped captions replaced by the empty-caption embedding."""

    @property
    def size(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class NoiseDraw:
    """The random part of one loss evaluation."""

    noise: torch.Tensor
    """(B, C, h, w) float32 Gaussian noise (plus the offset, if configured): the epsilon target."""
    timesteps: torch.Tensor
    """(B,) int64 in [0, num_train_timesteps)."""


def prepare_batch(
    raw: dict[str, torch.Tensor],
    info: cache.CacheInfo,
    empty_caption: torch.Tensor,
    cfg: LossConfig,
    generator: torch.Generator,
) -> CachedBatch:
    """Turn a batch read from the cache into the UNet's inputs.

    Args:
        raw: cache columns as read by Ray: ``latent`` (and ``latent_std``) (B, C*h*w) and ``text_embeds``
            (B, 77*D), float16, on the training device (the bucket batcher gives (B, C, h, w) and (B, 77, D)).
        info: the cache metadata (shapes, scaling factor, whether std is stored).
        empty_caption: (77, D) embedding of "" on the training device.
        cfg: loss options (posterior sampling, caption dropout).
        generator: drives the posterior sample and the dropout draw.
    """
    latents = _as_latents(raw[cache.LATENT], info).float()  # (B, C, h, w), unscaled
    if cfg.sample_posterior and info.has_std:
        std = _as_latents(raw[cache.LATENT_STD], info).float()
        latents = latents + std * _randn(latents.shape, generator, latents.device)
    latents = latents * info.vae_scaling_factor  # the only place latents are scaled
    text = raw[cache.TEXT_EMBEDS].reshape(-1, *info.text_embeds_shape).float()  # (B, 77, D)
    if cfg.caption_dropout > 0:
        u = torch.rand(text.shape[0], generator=generator, device=generator.device).to(text.device)
        drop = (u < cfg.caption_dropout)[:, None, None]  # (B, 1, 1)
        text = torch.where(drop, empty_caption.float().to(text.device), text)
    return CachedBatch(latents=latents, text_embeds=text)


def _as_latents(values: torch.Tensor, info: cache.CacheInfo) -> torch.Tensor:
    """(B, C, h, w): as given by the bucket batcher (any bucket's shape), or reshaped from Ray's flat rows."""
    return values if values.dim() == 4 else values.reshape(-1, *info.latent_shape)


def _randn(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def draw_noise(
    latents: torch.Tensor, scheduler: SchedulerMixin, cfg: LossConfig, generator: torch.Generator
) -> NoiseDraw:
    """Gaussian noise shaped like ``latents`` (B, C, h, w) and one uniform timestep per example."""
    b, c = latents.shape[:2]
    noise = _randn(latents.shape, generator, latents.device)
    if cfg.noise_offset > 0:  # a per-(example, channel) constant shifts the image's mean brightness
        noise = noise + cfg.noise_offset * _randn((b, c, 1, 1), generator, latents.device)
    num_t = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (b,), generator=generator, device=generator.device).to(latents.device)
    return NoiseDraw(noise=noise, timesteps=t.long())


def _epsilon_target(scheduler, latents, noise, t) -> torch.Tensor:
    return noise


def _v_target(scheduler, latents, noise, t) -> torch.Tensor:
    # v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (https://arxiv.org/abs/2202.00512, section 4)
    return scheduler.get_velocity(latents, noise, t)


TARGETS: dict[str, Callable[..., torch.Tensor]] = {"epsilon": _epsilon_target, "v_prediction": _v_target}


def loss_weights(scheduler: SchedulerMixin, t: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """(B,) per-example weights: 1, or min-SNR-gamma (https://arxiv.org/abs/2303.09556, eq. 9).

    For an epsilon target the weight is min(SNR, gamma) / SNR; a v target already carries a factor
    SNR + 1 relative to x0, so it becomes min(SNR, gamma) / (SNR + 1) (as in diffusers' training scripts).
    """
    if cfg.snr_gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    snr = compute_snr(scheduler, t)  # (B,) alpha_t^2 / sigma_t^2
    clipped = snr.clamp(max=cfg.snr_gamma)
    return clipped / snr if cfg.prediction_type == "epsilon" else clipped / (snr + 1)


def example_losses(
    unet: UNet2DConditionModel | torch.nn.Module,
    scheduler: SchedulerMixin,
    batch: CachedBatch,
    cfg: LossConfig,
    draw: NoiseDraw,
) -> torch.Tensor:
    """(B,) float32: each example's weighted MSE between the UNet's prediction and the target."""
    if cfg.prediction_type not in TARGETS:
        raise ValueError(f"unresolved prediction_type {cfg.prediction_type!r}: use LossConfig.resolve first")
    noisy = scheduler.add_noise(batch.latents, draw.noise, draw.timesteps)  # (B, C, h, w)
    pred = unet(noisy, draw.timesteps, encoder_hidden_states=batch.text_embeds).sample  # (B, C, h, w)
    target = TARGETS[cfg.prediction_type](scheduler, batch.latents, draw.noise, draw.timesteps)
    per_example = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return per_example * loss_weights(scheduler, draw.timesteps, cfg)


def diffusion_loss(
    unet: UNet2DConditionModel | torch.nn.Module,
    scheduler: SchedulerMixin,
    batch: CachedBatch,
    cfg: LossConfig,
    draw: NoiseDraw,
) -> torch.Tensor:
    """Weighted MSE between the UNet's prediction and the target, averaged over the batch (a float32 scalar)."""
    return example_losses(unet, scheduler, batch, cfg, draw).mean()


def paired_batch(instance: CachedBatch, klass: CachedBatch) -> CachedBatch:
    """DreamBooth: instance rows first, then as many class rows; `prior_preservation_loss` splits them again."""
    if instance.size != klass.size:
        raise ValueError(f"prior preservation pairs equal batches, got {instance.size} and {klass.size}")
    return CachedBatch(
        latents=torch.cat([instance.latents, klass.latents]),  # (2B, C, h, w)
        text_embeds=torch.cat([instance.text_embeds, klass.text_embeds]),  # (2B, 77, D)
    )


def prior_preservation_loss(  # noqa: PLR0913 - the loss signature plus the one weight
    unet: UNet2DConditionModel | torch.nn.Module,
    scheduler: SchedulerMixin,
    batch: CachedBatch,
    cfg: LossConfig,
    draw: NoiseDraw,
    *,
    prior_loss_weight: float,
) -> torch.Tensor:
    """DreamBooth's objective on a `paired_batch`: instance MSE + prior_loss_weight x class MSE.

    One UNet call over both halves, split with ``chunk(2)`` as diffusers' train_dreambooth.py does
    (https://arxiv.org/abs/2208.12242, eq. 2: the class term keeps the model's prior for the class noun).
    """
    instance, klass = example_losses(unet, scheduler, batch, cfg, draw).chunk(2)  # (B,), (B,)
    return instance.mean() + prior_loss_weight * klass.mean()
