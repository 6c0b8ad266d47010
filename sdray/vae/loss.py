"""VAE objective and metric as small pure functions: reconstruction (L1 + MSE, foreground-weighted) + KL, PSNR.

Images are float tensors in [-1, 1], shape (B, 3, H, W). The posterior sample goes through the decoder
(the reparameterisation trick, Kingma & Welling 2013, https://arxiv.org/abs/1312.6114); the KL term keeps
latents near N(0, 1) so they stay smooth enough for diffusion, with a small weight as in Stable Diffusion's
autoencoder (Rombach et al. 2022, https://arxiv.org/abs/2112.10752).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from sdray.vae.config import VaeTrainConfig


class Autoencode(torch.nn.Module):
    """Encode, sample the posterior, decode: one forward call, so DDP sees every parameter's gradient."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction (B, 3, H, W), KL divergence per image (B,))."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator=generator)  # (B, C, H/f, W/f)
        return self.vae.decode(latents).sample, posterior.kl()


def foreground_weights(images: torch.Tensor, cfg: VaeTrainConfig) -> torch.Tensor:
    """(B, 1, H, W) per-pixel weights: ``cfg.foreground_weight`` where a pixel differs from its image's border
    colour (the median of the outermost pixels) by more than ``cfg.foreground_threshold``, else 1."""
    if cfg.foreground_weight == 1.0:
        return torch.ones_like(images[:, :1])
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )  # (B, 3, 4W)
    background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
    # [-1, 1] images: a difference of 2 * threshold is `threshold` on the 0-1 scale.
    foreground = (images - background).abs().amax(dim=1, keepdim=True) > 2 * cfg.foreground_threshold
    return 1.0 + (cfg.foreground_weight - 1.0) * foreground.float()


def vae_loss(
    autoencode: torch.nn.Module,
    images: torch.Tensor,
    cfg: VaeTrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (for logging).

    Args:
        autoencode: an :class:`Autoencode` (possibly DDP-wrapped).
        images: (B, 3, H, W) float in [-1, 1].

    Returns:
        (scalar loss with grad, {"l1", "mse", "kl"} as floats).
    """
    recon, kl = autoencode(images, generator)
    weights = foreground_weights(images, cfg)  # (B, 1, H, W)
    norm = weights.mean()  # a weighted mean, so the loss scale does not depend on the foreground's size
    diff = recon.float() - images
    l1 = (diff.abs() * weights).mean() / norm
    mse = (diff.pow(2) * weights).mean() / norm
    kl = kl.float().mean()  # under bf16 autocast the posterior's KL comes back in bf16
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, for images in [-1, 1] (peak-to-peak 2).

    Returns:
        (B,) float; the same number as PSNR on the 0-255 scale with peak 255.
    """
    mse = (reconstruction.clamp(-1, 1) - images).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10.0 * torch.log10(4.0 / mse)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean (what preprocessing caches), clamped to [-1, 1]."""
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
