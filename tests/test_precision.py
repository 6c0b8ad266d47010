"""Mixed precision of the training stages (sdray/precision.py): what each setting means on each device, bf16
on the CPU for the VAE step and a LoRA run's frozen weights, and the settings that are refused."""

from __future__ import annotations

import logging

import pytest
import torch

from sdray import precision
from sdray.errors import ConfigError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.train.config import LoraConfig, TrainConfig
from sdray.train.state import build_state
from sdray.vae.config import VaeTrainConfig
from sdray.vae.loss import Autoencode, psnr, reconstruct, vae_loss

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


def test_the_vae_trains_under_bf16_with_fp32_weights_loss_and_gradients(native_bf16, one_thread):
    torch.manual_seed(0)
    vae = load_components(load_pipeline_config("demo").model, ["vae"]).vae.train()
    images = -torch.ones(4, 3, 32, 32)
    for i in range(4):
        images[i, i % 3, 4 + 4 * i : 14 + 4 * i, 5:15] = 1.0
    before = psnr(reconstruct(vae.eval(), images), images).mean().item()
    vae.train()
    autoencode, cfg = Autoencode(vae), VaeTrainConfig(foreground_weight=10.0, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    with precision.autocast(cfg.mixed_precision, CPU):
        assert autoencode(images)[0].dtype == torch.bfloat16
    for _ in range(30):
        with precision.autocast(cfg.mixed_precision, CPU):
            loss, _ = vae_loss(autoencode, images, cfg)
        assert loss.dtype == torch.float32
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in vae.parameters())
    after = psnr(reconstruct(vae.eval(), images), images).mean().item()
    assert after > before + 3, (before, after)


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
