"""DreamBooth prior preservation: the paired loss (unit), its errors, and a short 2-worker run on real Ray."""

from __future__ import annotations

import pytest
import torch
from cache_fixtures import TINY_INFO

from sdray.data import cache
from sdray.train.config import LossConfig
from sdray.train.loss import (
    CachedBatch,
    NoiseDraw,
    diffusion_loss,
    paired_batch,
    prepare_batch,
    prior_preservation_loss,
)

B = 2


def _batch(seed: int) -> CachedBatch:
    g = torch.Generator().manual_seed(seed)
    raw = {
        cache.LATENT: torch.randn(B, 4 * 8 * 8, generator=g).half(),
        cache.LATENT_STD: torch.zeros(B, 4 * 8 * 8).half(),
        cache.TEXT_EMBEDS: torch.randn(B, 77 * 32, generator=g).half(),
    }
    cfg = LossConfig(sample_posterior=False)
    return prepare_batch(raw, TINY_INFO, torch.zeros(77, 32), cfg, torch.Generator().manual_seed(0))


def _draw(rows: slice) -> NoiseDraw:
    g = torch.Generator().manual_seed(7)
    noise, t = torch.randn(2 * B, 4, 8, 8, generator=g), torch.tensor([3, 400, 999, 120])
    return NoiseDraw(noise=noise[rows], timesteps=t[rows])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_prior_loss_is_instance_mse_plus_weighted_class_mse(tiny_components, weight):
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    cfg = LossConfig(snr_gamma=5.0)
    instance, klass = _batch(1), _batch(2)
    with torch.no_grad():
        got = prior_preservation_loss(
            unet, scheduler, paired_batch(instance, klass), cfg, _draw(slice(None)), prior_loss_weight=weight
        )
        inst = diffusion_loss(unet, scheduler, instance, cfg, _draw(slice(0, B)))
        prior = diffusion_loss(unet, scheduler, klass, cfg, _draw(slice(B, None)))
        swapped = prior_preservation_loss(
            unet, scheduler, paired_batch(klass, instance), cfg, _draw(slice(None)), prior_loss_weight=weight
        )
    assert abs(inst - prior) > 1e-3  # the halves differ, so a mix-up would show
    torch.testing.assert_close(got, inst + weight * prior, rtol=1e-5, atol=1e-6)
    if weight != 1.0:  # the first half is the instance half: the order of the pair matters
        assert abs(got - swapped) > 1e-4


def test_paired_batch_needs_equal_halves():
    one, two = _batch(1), _batch(2)
    short = CachedBatch(latents=two.latents[:1], text_embeds=two.text_embeds[:1])
    with pytest.raises(ValueError, match="equal batches"):
        paired_batch(one, short)
    pair = paired_batch(one, two)
    assert pair.size == 2 * B and torch.equal(pair.latents[B:], two.latents)
