"""The objective against an independent computation of the formula, and its options one by one."""

import math

import pytest
import torch
from cache_fixtures import TINY_INFO

from sdray.data import cache
from sdray.errors import ConfigError
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.train.checkpoint import RunSpec
from sdray.train.config import LossConfig, TrainConfig
from sdray.train.loss import TARGETS, NoiseDraw, diffusion_loss, draw_noise, loss_weights, prepare_batch
from sdray.train.seeds import Stream, stream_seed

INFO = TINY_INFO
B = 4


def _raw(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        cache.LATENT: torch.randn(B, 4 * 8 * 8, generator=g).half(),
        cache.LATENT_STD: (torch.rand(B, 4 * 8 * 8, generator=g) * 0.1).half(),
        cache.TEXT_EMBEDS: torch.randn(B, 77 * 32, generator=g).half(),
    }


def _reference_loss(unet, raw, draw, *, target, gamma):
    """SD's objective written out from the DDPM formulas, not from diffusers' scheduler or compute_snr."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alpha_bar = torch.cumprod(1.0 - betas, 0)[draw.timesteps].float()[:, None, None, None]  # (B, 1, 1, 1)
    x0 = raw[cache.LATENT].float().reshape(B, 4, 8, 8) * 0.18215
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * draw.noise
    text = raw[cache.TEXT_EMBEDS].float().reshape(B, 77, 32)
    pred = unet(noisy, draw.timesteps, encoder_hidden_states=text).sample
    y = draw.noise if target == "epsilon" else alpha_bar.sqrt() * draw.noise - (1 - alpha_bar).sqrt() * x0
    mse = ((pred - y) ** 2).mean(dim=(1, 2, 3))
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    if gamma:
        weight = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if target == "epsilon" else snr + 1)
    else:
        weight = torch.ones_like(snr)
    return (weight * mse).mean()


@pytest.mark.parametrize(
    ("target", "gamma"), [("epsilon", 0.0), ("epsilon", 5.0), ("v_prediction", 0.0), ("v_prediction", 5.0)]
)
def test_loss_matches_the_formula(tiny_components, target, gamma):
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    cfg = LossConfig(prediction_type=target, snr_gamma=gamma, sample_posterior=False)
    raw = _raw()
    g = torch.Generator().manual_seed(1)
    # timesteps spread over the schedule, including both ends, so min-SNR clips some and not others
    draw = NoiseDraw(noise=torch.randn(B, 4, 8, 8, generator=g), timesteps=torch.tensor([0, 10, 500, 999]))
    batch = prepare_batch(raw, INFO, torch.zeros(77, 32), cfg, torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = diffusion_loss(unet, scheduler, batch, cfg, draw)
        want = _reference_loss(unet, raw, draw, target=target, gamma=gamma)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    if gamma:  # the weighting changes the value: the test would notice it being ignored
        no_snr = LossConfig(prediction_type=target, sample_posterior=False)
        with torch.no_grad():
            assert not math.isclose(float(diffusion_loss(unet, scheduler, batch, no_snr, draw)), float(got))


def test_latents_are_scaled_exactly_once():
    raw = _raw()
    batch = prepare_batch(
        raw, INFO, torch.zeros(77, 32), LossConfig(sample_posterior=False), torch.Generator()
    )
    expected = raw[cache.LATENT].float().reshape(B, 4, 8, 8) * INFO.vae_scaling_factor
    torch.testing.assert_close(batch.latents, expected, rtol=0, atol=0)
    assert batch.text_embeds.shape == (B, 77, 32) and batch.text_embeds.dtype == torch.float32


def test_posterior_sample_uses_mean_and_std():
    raw = _raw()
    batch = prepare_batch(raw, INFO, torch.zeros(77, 32), LossConfig(), torch.Generator().manual_seed(5))
    eps = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    mean = raw[cache.LATENT].float().reshape(B, 4, 8, 8)
    std = raw[cache.LATENT_STD].float().reshape(B, 4, 8, 8)
    torch.testing.assert_close(batch.latents, (mean + std * eps) * INFO.vae_scaling_factor)
    no_std = cache.CacheInfo(**{**INFO.__dict__, "has_std": False})
    plain = prepare_batch(raw, no_std, torch.zeros(77, 32), LossConfig(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain.latents, mean * INFO.vae_scaling_factor)


def test_caption_dropout_uses_the_empty_caption_embedding():
    empty = torch.full((77, 32), 7.0)
    raw = {k: v.repeat(64, 1) for k, v in _raw().items()}  # 256 rows
    info = cache.CacheInfo(**{**INFO.__dict__, "has_std": False})
    out = prepare_batch(raw, info, empty, LossConfig(caption_dropout=0.25), torch.Generator().manual_seed(0))
    dropped = (out.text_embeds == 7.0).all(dim=(1, 2))
    kept = raw[cache.TEXT_EMBEDS].float().reshape(-1, 77, 32)
    assert torch.equal(out.text_embeds[~dropped], kept[~dropped])
    assert 0.15 < dropped.float().mean() < 0.35
    none = prepare_batch(raw, info, empty, LossConfig(), torch.Generator())
    assert torch.equal(none.text_embeds, kept)


def test_noise_offset_adds_a_constant_per_channel(tiny_components):
    latents = torch.zeros(B, 4, 8, 8)
    base = draw_noise(latents, tiny_components.scheduler, LossConfig(), torch.Generator().manual_seed(3))
    shifted = draw_noise(
        latents, tiny_components.scheduler, LossConfig(noise_offset=0.1), torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    torch.randn(B, 4, 8, 8, generator=g)
    offset = 0.1 * torch.randn(B, 4, 1, 1, generator=g)
    torch.testing.assert_close(shifted.noise, base.noise + offset)
    assert base.timesteps.dtype == torch.int64
    assert int(base.timesteps.min()) >= 0 and int(base.timesteps.max()) < 1000


def test_objective_is_one_validated_section_resolved_once():
    assert LossConfig().resolve({"prediction_type": "v_prediction"}).prediction_type == "v_prediction"
    assert LossConfig(prediction_type="epsilon").resolve(
        {"prediction_type": "v_prediction"}
    ).prediction_type == ("epsilon")
    with pytest.raises(ConfigError, match="'sample' is not supported"):
        LossConfig().resolve({"prediction_type": "sample"})
    with pytest.raises(
        ConfigError, match=r"train\.loss: loss\.caption_dropout must be in \[0, 1\), got 1\.0"
    ):
        load_pipeline_config("tiny", ["train.loss.caption_dropout=1.0"])
    with pytest.raises(ConfigError, match=r"train\.loss: loss\.snr_gamma must be >= 0"):
        load_pipeline_config("tiny", ["train.loss.snr_gamma=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.snr_gamma'"):  # one place for the objective
        load_pipeline_config("tiny", ["train.snr_gamma=5"])
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    # The run spec carries the resolved objective: workers, validation and export never resolve it again.
    with pytest.raises(ConfigError, match=r"unresolved \(train\.loss\.prediction_type is empty\)"):
        RunSpec(train=TrainConfig(), model=ModelConfig(), info=INFO)
    resolved = TrainConfig(loss=LossConfig(prediction_type="epsilon", snr_gamma=5.0))
    spec = RunSpec(train=resolved, model=ModelConfig(), info=INFO)
    assert RunSpec.from_dict(spec.to_dict()).train.loss == resolved.loss
    with pytest.raises(ValueError, match="unresolved prediction_type ''"):
        diffusion_loss(None, None, None, LossConfig(), None)  # type: ignore[arg-type]


def test_zero_terminal_snr_needs_v_prediction_whose_last_target_is_the_image():
    from diffusers import DDPMScheduler

    with pytest.raises(ConfigError, match="zero-terminal-SNR.*use v_prediction"):
        LossConfig(prediction_type="epsilon").resolve({"rescale_betas_zero_snr": True})
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True, prediction_type="v_prediction")  # fmt: skip
    cfg = LossConfig(snr_gamma=5.0).resolve(scheduler.config)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    # At the last timestep the input is pure noise and the v target is -x0: the model must draw the caption.
    torch.testing.assert_close(scheduler.add_noise(latents, noise, last), noise)
    torch.testing.assert_close(TARGETS["v_prediction"](scheduler, latents, noise, last), -latents)
    weights = loss_weights(scheduler, torch.tensor([0, 500, 999]), cfg)
    assert torch.isfinite(weights).all() and float(weights[-1]) == 0.0


def test_loss_curve_png():
    from sdray.train.metrics import loss_curve_png

    rows = [{"step": i, "loss": 1 / i, "lr": 1e-3} for i in range(1, 30)]
    png = loss_curve_png(rows)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_seed_streams_never_collide_across_ranks_epochs_and_purposes():
    """The old sums collided: seed*1000 + rank (global) at rank 17 was seed*1000 + 17 + rank (generator) at
    rank 0, and the post-resume seed step*7919 + rank ignored the run's seed."""
    seeds = [stream_seed(seed, stream, rank) for seed in range(3) for stream in Stream for rank in range(32)]
    seeds += [stream_seed(seed, Stream.SHUFFLE, rank, epoch) for seed in range(3) for rank in range(8)
              for epoch in range(32)]  # fmt: skip
    seeds += [stream_seed(seed, Stream.RESEED, rank, step) for seed in range(3) for rank in range(8)
              for step in range(0, 1000, 50)]  # fmt: skip
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**32 for s in seeds)
    assert stream_seed(0, Stream.GLOBAL, 17) != stream_seed(0, Stream.GENERATOR, 0)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        TrainConfig(seed=-1)
