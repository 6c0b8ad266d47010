import time

import pytest
import torch

from sdray.errors import ConfigError, InputError
from sdray.models.components import load_components, save_components
from sdray.models.config import ModelConfig
from sdray.models.fingerprint import encoder_fingerprint


def test_tiny_builds_fast_and_follows_sd_data_flow(tiny_components):
    start = time.perf_counter()
    c = load_components(ModelConfig())
    assert time.perf_counter() - start < 5  # generous: "well under a second" on an idle machine
    ids = c.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        embeds = c.text_encoder(ids).last_hidden_state
        latents = c.vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.mean
        noise_pred = c.unet(latents, torch.tensor([10, 500]), embeds.expand(2, -1, -1)).sample
    assert embeds.shape == (1, 77, c.text_embed_dim)
    assert c.unet.config.cross_attention_dim == c.text_embed_dim
    assert latents.shape == (2, 4, 8, 8)  # 8x downsampling, 4 latent channels
    assert c.vae_downsample == 8
    assert noise_pred.shape == latents.shape


def test_preset_weights_are_deterministic_per_part():
    a = load_components(ModelConfig(seed=3), parts=["vae"])
    b = load_components(ModelConfig(seed=3), parts=["unet", "vae"])
    c = load_components(ModelConfig(seed=4), parts=["vae"])
    wa, wb, wc = (next(iter(m.vae.state_dict().values())) for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_overrides_change_the_architecture():
    c = load_components(
        ModelConfig(
            vae={
                "block_out_channels": [8, 16, 16],
                "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3,
            }
        ),
        parts=["vae"],
    )
    assert c.vae_downsample == 4


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError, match="model.unet"):
        load_components(ModelConfig(unet={"no_such_option": 1}), parts=["unet"])


def test_directory_round_trip(tiny_components, tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert list((tiny_model_dir / "unet").glob("*.safetensors"))
    loaded = load_components(ModelConfig(path=str(tiny_model_dir)))
    for name in ("unet", "vae", "text_encoder"):
        for (k, v), (k2, v2) in zip(
            getattr(tiny_components, name).state_dict().items(),
            getattr(loaded, name).state_dict().items(),
            strict=True,
        ):
            assert k == k2 and torch.equal(v, v2), f"{name}.{k} differs after reload"
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.scheduler.config.num_train_timesteps == 1000


def test_loaded_directory_works_in_diffusers_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_missing_directory_names_the_folder(tmp_path):
    with pytest.raises(InputError, match=r"not a diffusers model directory \(no unet/\)"):
        load_components(ModelConfig(path=str(tmp_path)), parts=["unet"])
    with pytest.raises(InputError, match=f"model.path {tmp_path / 'nope'}: does not exist"):
        load_components(ModelConfig(path=str(tmp_path / "nope")), parts=["unet"])


def test_fingerprint_stable_across_save_and_load(tiny_components, tiny_model_dir):
    fp = encoder_fingerprint(tiny_components)
    assert len(fp) == 64
    assert encoder_fingerprint(load_components(ModelConfig(path=str(tiny_model_dir)))) == fp
    assert (
        encoder_fingerprint(load_components(ModelConfig(seed=1), parts=["vae", "text_encoder", "tokenizer"]))
        != fp
    )


def test_save_is_atomic_on_failure(tiny_components, tmp_path, monkeypatch):
    import diffusers

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_components(tiny_components, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
