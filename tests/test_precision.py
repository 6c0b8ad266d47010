"""Mixed precision of the training stages (sdray/precision.py): what each setting means on each device, bf16
on the CPU for the VAE step and a LoRA run's frozen weights, and the settings that are refused."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from cache_fixtures import TINY_INFO
from vae_fixtures import demo_vae_and_squares, psnr_gain

from sdray import precision
from sdray.data import cache
from sdray.errors import ConfigError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.train.checkpoint import RunSpec
from sdray.train.config import LoraConfig, LossConfig, TrainConfig
from sdray.train.loop import StepRunner, make_objective
from sdray.train.state import build_state
from sdray.vae.config import VaeTrainConfig
from sdray.vae.loss import Autoencode
from sdray.vae.train import VaeTrainState, optimizer_step

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # only the device type is read: no GPU needed


@pytest.fixture
def native_bf16(monkeypatch):
    """This CPU reports native bf16 whatever the test machine has."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


@pytest.mark.parametrize(
    ("mode", "device", "dtype"),
    [
        ("auto", CPU, None),
        ("auto", GPU, torch.bfloat16),
        ("no", CPU, None),
        ("no", GPU, None),
        ("bf16", CPU, torch.bfloat16),
        ("bf16", GPU, torch.bfloat16),
        ("fp16", GPU, torch.float16),
    ],
)
def test_each_setting_on_each_device(native_bf16, mode, device, dtype):
    assert precision.autocast_dtype(mode, device) == dtype


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    precision._warn_no_native_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="sdray.precision"):
        assert precision.autocast_dtype("bf16", CPU) is None
        assert precision.autocast_dtype("bf16", CPU) is None
        assert precision.autocast_dtype("bf16", GPU) == torch.bfloat16
    assert [r.getMessage() for r in caplog.records] == [
        "mixed_precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); training in fp32"
    ]


def test_autocast_runs_matmuls_in_the_chosen_dtype(native_bf16):
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with precision.autocast("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    with precision.autocast("auto", CPU):
        assert layer(x).dtype == torch.float32


def _output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of each output ``module`` computes from now on (a forward hook)."""
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _module, _args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize(("mode", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_vae_step_trains_in_the_configured_precision(native_bf16, one_thread, mode, dtype):
    vae, images = demo_vae_and_squares()
    cfg = VaeTrainConfig(foreground_weight=10.0, mixed_precision=mode)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    state = VaeTrainState(vae, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0))
    autoencode, generator, losses = Autoencode(vae), torch.Generator().manual_seed(0), []
    decoded = _output_dtypes(vae.decoder.conv_out)

    def step() -> None:
        losses.append(optimizer_step(autoencode, images, cfg, generator, state)[0])

    gain = psnr_gain(vae, images, step)
    # PSNR before, 30 training steps, PSNR after: only the steps run under autocast
    assert decoded == [torch.float32, *[dtype] * 30, torch.float32]
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert all(math.isfinite(loss) for loss in losses) and gain > 3, (losses[-1], gain)


@pytest.mark.parametrize(("mode", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_unet_step_trains_in_the_configured_precision(native_bf16, mode, dtype):
    cfg = TrainConfig(mixed_precision=mode, loss=LossConfig(prediction_type="epsilon"))
    spec = RunSpec(train=cfg, model=ModelConfig(), info=TINY_INFO)
    state = build_state(cfg, spec.model, CPU, rank=0)
    scheduler = load_components(spec.model, ["scheduler"]).scheduler
    empty = torch.zeros(TINY_INFO.text_embeds_shape)
    objective = make_objective(spec, empty, cfg.loss)
    runner = StepRunner(spec, state, state.unet, scheduler, empty, CPU, 1, objective)
    predicted = _output_dtypes(state.unet.conv_out)
    before = [p.detach().clone() for p in state.params]

    loss, grad_norm, _ = runner.step(iter([_cached_batch(cfg.batch_size)]))

    assert predicted == [dtype]
    assert math.isfinite(loss) and grad_norm > 0
    assert all(p.dtype == torch.float32 for p in state.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.params, strict=True))


def _cached_batch(rows: int) -> dict[str, torch.Tensor]:
    """A micro-batch as the cache reader yields it: flat fp16 latents, their std and text embeddings."""
    g, latent, text = (
        torch.Generator().manual_seed(0),
        math.prod(TINY_INFO.latent_shape),
        TINY_INFO.text_embeds_shape,
    )
    return {
        cache.LATENT: torch.randn(rows, latent, generator=g).half(),
        cache.LATENT_STD: (torch.rand(rows, latent, generator=g) * 0.1).half(),
        cache.TEXT_EMBEDS: torch.randn(rows, math.prod(text), generator=g).half(),
    }


def test_a_lora_run_keeps_frozen_weights_in_the_autocast_dtype(native_bf16):
    lora = LoraConfig(enabled=True, rank=4)
    bf16 = build_state(TrainConfig(lora=lora, mixed_precision="bf16"), ModelConfig(), CPU, rank=0)
    frozen = {p.dtype for p in bf16.unet.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert bf16.params and {p.dtype for p in bf16.params} == {torch.float32}
    fp32 = build_state(TrainConfig(lora=lora), ModelConfig(), CPU, rank=0)
    assert {p.dtype for p in fp32.unet.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.mixed_precision=fp16", "mixed_precision fp16 needs use_gpu: true"),
        ("vae_train.mixed_precision=fp16", "mixed_precision fp16 is not supported for the VAE"),
        ("train.mixed_precision=bf8", "must be one of"),
    ],
)
def test_refused_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config("tiny", [override])
