"""VAE stage units (no Ray): loss, PSNR, foreground weights, decoding, split, config, demo preset."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from vae_fixtures import demo_vae_and_squares, psnr_gain

from sdray.errors import ConfigError
from sdray.models.components import load_components
from sdray.pipeline_config import load_pipeline_config
from sdray.vae.config import VaeTrainConfig
from sdray.vae.data import decode_image, in_holdout, to_model_input
from sdray.vae.loss import Autoencode, foreground_weights, psnr, vae_loss


def test_psnr_known_values():
    images = torch.zeros(2, 3, 8, 8)
    recon = images.clone()
    recon[1] += 0.2  # mse 0.04 on a peak-to-peak range of 2 -> 10 log10(4 / 0.04) = 20 dB
    values = psnr(recon, images)
    assert values[1].item() == pytest.approx(20.0, abs=1e-4)
    assert values[0].item() == pytest.approx(10 * math.log10(4 / 1e-10))


def test_foreground_weights_mark_the_shape():
    images = -torch.ones(1, 3, 16, 16)  # black in [-1, 1]
    images[:, 0, 4:8, 4:8] = 1.0  # a red square
    weights = foreground_weights(images, VaeTrainConfig(foreground_weight=10.0))
    assert weights.shape == (1, 1, 16, 16)
    assert weights[0, 0, 4:8, 4:8].eq(10).all() and weights.sum().item() == 16 * 10 + (256 - 16)
    assert foreground_weights(images, VaeTrainConfig()).eq(1).all()


def test_weighted_loss_counts_foreground_errors_more():
    images = -torch.ones(1, 3, 16, 16)
    images[:, 0, 4:8, 4:8] = 1.0

    class Fixed(torch.nn.Module):  # returns a given reconstruction, to test the loss arithmetic alone
        def __init__(self, recon):
            super().__init__()
            self.recon = recon

        def forward(self, x, generator=None):
            return self.recon, torch.zeros(len(x))

    miss_shape = images.clone()
    miss_shape[:, 0, 4:8, 4:8] = -1.0  # background reconstructed, shape lost
    plain = vae_loss(Fixed(miss_shape), images, VaeTrainConfig())[1]
    weighted = vae_loss(Fixed(miss_shape), images, VaeTrainConfig(foreground_weight=10.0))[1]
    # 16 of 256 pixels wrong by 2 in one of 3 channels: plain L1 = 2 * 16 / (256 * 3).
    assert plain["l1"] == pytest.approx(2 * 16 / 768)
    assert weighted["l1"] == pytest.approx(2 * 160 / (3 * (160 + 240)))


def test_training_steps_improve_reconstruction(one_thread):
    vae, images = demo_vae_and_squares()
    autoencode, train_cfg = Autoencode(vae), VaeTrainConfig(foreground_weight=10.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)

    def step() -> None:
        loss, _ = vae_loss(autoencode, images, train_cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    gain = psnr_gain(vae, images, step)
    assert gain > 3, gain


def _png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 0, 0), (width // 2 - 2, height // 2 - 2, width // 2 + 2, height // 2 + 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_resizes_and_center_crops():
    pixels = decode_image(_png(96, 64), 32)  # -> 48x32, crop the centre 32x32
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert pixels[0, 16, 16] > 200 and pixels[0, 0, 0] == 0
    floats = to_model_input(torch.from_numpy(pixels)[None])
    assert floats.min().item() == -1.0 and floats.max().item() <= 1.0


def test_holdout_split_is_stable_and_sized():
    ids = [f"row-{i}" for i in range(5000)]
    held = [i for i in ids if in_holdout(i, 0.1)]
    assert 400 < len(held) < 600
    assert held == [i for i in ids if in_holdout(i, 0.1)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("vae_train.holdout_fraction=0", "holdout_fraction"),
        ("vae_train.resolution=60", "multiple of 8"),
        ("vae_train.foreground_weight=0.5", "foreground_weight"),
        ("vae_train.lr_schedule=linear", "must be one of"),
        ("vae_train.batchsize=4", "vae_train.batchsize"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config("tiny", [override])


def test_demo_preset_sizes():
    cfg = load_pipeline_config("demo")
    parts = load_components(cfg.model, ["vae", "unet", "text_encoder"])
    assert parts.vae_downsample == 4 and parts.vae.config.norm_num_groups == 8
    assert parts.vae.config.mid_block_add_attention is False
    assert parts.text_encoder.config.hidden_size == 64 and parts.text_encoder.config.num_hidden_layers == 2
    assert 1.5e6 < sum(p.numel() for p in parts.unet.parameters()) < 1.9e6
    assert parts.unet.config.sample_size * parts.vae_downsample == cfg.synth.resolution
    assert cfg.synth.held_out == 8 and len(cfg.synth.combinations()) == 72


def test_assemble_model_dir_checks_inputs(tmp_path, tiny_components):
    from sdray.errors import InputError
    from sdray.models.config import ModelConfig
    from sdray.vae.export import assemble_model_dir

    with pytest.raises(InputError, match="not a diffusers AutoencoderKL directory"):
        assemble_model_dir(tmp_path, ModelConfig(), tmp_path / "model")
    tiny_components.vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    mismatched = ModelConfig(unet={"in_channels": 8, "out_channels": 8})
    with pytest.raises(ConfigError, match="4 latent channels but model.unet.in_channels is 8"):
        assemble_model_dir(tmp_path / "vae", mismatched, tmp_path / "model")
    assert not (tmp_path / "model").exists()
