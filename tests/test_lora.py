"""LoRA without Ray: config checks, the training state (adapter only), export in diffusers' and kohya's formats
loaded by real diffusers, the sampler's `loras` and `sdray generate --lora`, and the bad-input errors."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import yaml

from sdray.errors import ConfigError, InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.models.lora import KOHYA_FILE, WEIGHTS_FILE, LoraSpec
from sdray.serve.request import GenerationRequest
from sdray.serve.sampler import Sampler, make_scheduler
from sdray.train.config import LoraConfig, LossConfig, TrainConfig
from sdray.train.lora import add_adapter, save_lora_dir
from sdray.train.run import check_lora
from sdray.train.state import build_state

LORA = LoraConfig(enabled=True, rank=4, alpha=2.0)  # alpha != rank: the scale (0.5) must survive export
REQ = GenerationRequest(
    prompt="a large red circle",
    seeds=(3,),
    width=32,
    height=32,
    steps=3,
    guidance_scale=5.0,
    scheduler="ddim",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_unet(cfg: LoraConfig = LORA, *, seed: int = 5):
    """The tiny UNet with an adapter whose B matrices are non-zero (as after training)."""
    unet = load_components(ModelConfig(), ["unet"]).unet
    add_adapter(unet, cfg, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return unet.eval()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    out.mkdir()
    return save_lora_dir(_trained_unet(dataclasses.replace(LORA, kohya=True)), out, kohya=True)


@functools.cache  # each image once per session: pipelines are slow to build on a loaded machine
def _diffusers_image(model_dir, lora: str | None, *, weight_name: str = WEIGHTS_FILE, scale: float = 1.0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    if lora:
        pipe.load_lora_weights(lora, weight_name=weight_name, adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[scale])
    pipe.scheduler = make_scheduler(REQ.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        REQ.prompt,
        num_inference_steps=REQ.steps,
        guidance_scale=REQ.guidance_scale,
        height=REQ.height,
        width=REQ.width,
        generator=torch.Generator().manual_seed(REQ.seeds[0]),
        output_type="np",
    ).images


@functools.cache
def _sdray_image(model_dir, *loras: LoraSpec) -> np.ndarray:
    components = load_components(ModelConfig(path=str(model_dir)))
    return Sampler(components, source=str(model_dir), loras=loras).sample([REQ], list(REQ.seeds))


def test_only_the_adapter_trains_and_the_state_holds_only_it():
    cfg = TrainConfig(data="x", output="y", lora=LORA)
    state = build_state(cfg, ModelConfig(), torch.device("cpu"), rank=0)
    names = [n for n, p in state.unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(state.params) == len(names) == 2 * 4 * 8  # q, k, v, out of 8 attention blocks
    opt_params = [p for group in state.optimizer.param_groups for p in group["params"]]
    assert len(opt_params) == len(names) and all(p.requires_grad for p in opt_params)
    assert len(state.ema.shadow_params) == len(names)

    saved = state.state_dict()
    assert saved["lora"] is True and len(saved["unet"]) == len(names)
    assert all(".lora_A." in k or ".lora_B." in k for k in saved["unet"])
    # gaussian init: A random, B zero, identical on every rank (DDP ranks build the same adapter)
    other = build_state(cfg, ModelConfig(), torch.device("cpu"), rank=1)
    assert all(torch.equal(v, other.state_dict()["unet"][k]) for k, v in saved["unet"].items())
    assert all(not v.any() for k, v in saved["unet"].items() if "lora_B" in k)

    full = build_state(dataclasses.replace(cfg, lora=LoraConfig()), ModelConfig(), torch.device("cpu"), 0)
    with pytest.raises(
        InputError, match="ckpt: saved by full fine-tuning run, but train.lora.enabled is True"
    ):
        state.load_state_dict(full.state_dict(), origin="ckpt")


def test_state_round_trip_restores_adapter_optimizer_and_ema(tmp_path):
    cfg = TrainConfig(data="x", output="y", lora=LORA, ema_decay=0.5)
    state = build_state(cfg, ModelConfig(), torch.device("cpu"), rank=0)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500])  # (B, 4, h, w)
    text = torch.randn(2, 77, 32, generator=gen)  # (B, 77, D)
    for _ in range(2):
        state.unet(x, t, text).sample.pow(2).mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.ema.step(state.params)
    torch.save(state.state_dict(), tmp_path / "state.pt")

    fresh = build_state(cfg, ModelConfig(), torch.device("cpu"), rank=0)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert any(p.abs().sum() > 0 for n, p in fresh.unet.named_parameters() if "lora_B" in n)  # it trained
    assert all(torch.equal(a, b) for a, b in zip(state.params, fresh.params, strict=True))
    for a, b in zip(state.ema.shadow_params, fresh.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    saved, loaded = state.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == len(state.params)
    assert all(torch.equal(saved[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"]) for k in saved)
    with torch.no_grad():
        assert torch.equal(state.unet(x, t, text).sample, fresh.unet(x, t, text).sample)


def test_bad_lora_settings_are_named(tiny_model_dir):
    with pytest.raises(ConfigError, match="rank must be >= 1, got 0"):
        LoraConfig(rank=0)
    cfg = TrainConfig(lora=dataclasses.replace(LORA, target_modules=("to_q", "to_qq", "attn9")))
    with pytest.raises(ConfigError, match=r"'to_qq', 'attn9' match no Linear or Conv2d module.*to_out\.0"):
        check_lora(cfg, ModelConfig())
    with pytest.raises(ConfigError, match="'to_qq', 'attn9' match no"):  # a pretrained base: its config.json
        check_lora(cfg, ModelConfig(path=str(tiny_model_dir)))
    check_lora(
        TrainConfig(lora=dataclasses.replace(LORA, target_modules=("proj_in", "ff.net.2"))), ModelConfig()
    )


def test_cli_rank_zero_and_missing_target_exit_2(tmp_path, capsys):
    from pipelines.train import main

    args = ["--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main([*args, "--set", "train.lora.rank=0"]) == 2
    assert capsys.readouterr().err.strip().endswith("train.lora: rank must be >= 1, got 0")
    assert main([*args, "--set", "train.lora.enabled=true", "--set", "train.lora.target_modules=[to_x]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.lora.target_modules: 'to_x' matches no") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_full_run_directory_does_not_resume_as_lora(tmp_path, capsys):
    import yaml

    from pipelines.train import main
    from sdray.data.cache import CacheInfo
    from sdray.train.checkpoint import RunSpec
    from sdray.train.run import CONFIG_FILE

    info = CacheInfo(
        vae_scaling_factor=0.18215,
        encoder_fingerprint="x",
        resolution=64,
        latent_shape=(4, 8, 8),
        text_embeds_shape=(77, 32),
    )
    (tmp_path / "run").mkdir()
    spec = RunSpec(
        train=TrainConfig(loss=LossConfig(prediction_type="epsilon")), model=ModelConfig(), info=info
    )
    (tmp_path / "run" / CONFIG_FILE).write_text(yaml.safe_dump(spec.to_dict()))
    args = [
        "--data",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "train.lora.enabled=true",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'run'} holds a run trained with other train.lora.enabled")


def test_export_loads_in_diffusers_like_sdray(tiny_model_dir, lora_dir):
    import json

    from safetensors import safe_open

    assert {p.name for p in lora_dir.iterdir()} == {WEIGHTS_FILE, KOHYA_FILE}
    with safe_open(str(lora_dir / WEIGHTS_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.") and ".lora." in k for k in f.keys())  # noqa: SIM118
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 2.0)
    ours = _sdray_image(tiny_model_dir, LoraSpec(str(lora_dir)))
    theirs = _diffusers_image(tiny_model_dir, str(lora_dir))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    base = _diffusers_image(tiny_model_dir, None)
    assert np.abs(ours - base).max() > 0.05  # the adapter changes the image
    # kohya's layout (A1111/ComfyUI) with its own alpha entries gives the same image in diffusers
    kohya = _diffusers_image(tiny_model_dir, str(lora_dir), weight_name=KOHYA_FILE)
    np.testing.assert_allclose(kohya, theirs, atol=1e-5, rtol=0)


def test_scales_and_two_adapters(tiny_model_dir, lora_dir):
    half = _sdray_image(tiny_model_dir, LoraSpec.parse(f"{lora_dir}:0.5"))
    np.testing.assert_allclose(half, _diffusers_image(tiny_model_dir, str(lora_dir), scale=0.5), atol=1e-5)
    assert np.abs(half - _sdray_image(tiny_model_dir, LoraSpec(str(lora_dir)))).max() > 0.01
    # two adapters at 0.5 each on the same weights = one at 1.0
    twice = _sdray_image(tiny_model_dir, LoraSpec(str(lora_dir), 0.5), LoraSpec(str(lora_dir), 0.5))
    np.testing.assert_allclose(twice, _sdray_image(tiny_model_dir, LoraSpec(str(lora_dir))), atol=1e-5)


def test_lora_spec_parse():
    assert LoraSpec.parse("runs/a/lora") == LoraSpec("runs/a/lora", 1.0)
    assert LoraSpec.parse("runs/a/lora:0.7") == LoraSpec("runs/a/lora", 0.7)
    assert LoraSpec.parse("s3://bucket/lora") == LoraSpec("s3://bucket/lora", 1.0)
    assert LoraSpec.parse("s3://bucket/lora:-1") == LoraSpec("s3://bucket/lora", -1.0)
    assert str(LoraSpec("d", 0.25)) == "d:0.25"


def test_adapter_for_another_base_or_architecture_is_refused(tiny_components, tmp_path):
    wide = ModelConfig(unet={"block_out_channels": [64, 64]})  # same module names, other shapes
    unet = load_components(wide, ["unet"]).unet
    add_adapter(unet, LORA, seed=0)
    save_lora_dir(unet, (tmp_path / "wide").resolve())
    deep = {
        "block_out_channels": [32, 32, 64],
        "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2,
    }
    unet = load_components(ModelConfig(unet=deep), ["unet"]).unet
    add_adapter(unet, LORA, seed=0)
    save_lora_dir(unet, tmp_path / "deep")  # diffusers alone loads the modules that exist and only warns

    components = load_components(ModelConfig())
    with pytest.raises(InputError, match=r"wide/pytorch_lora_weights.safetensors: the adapter does not fit"):
        Sampler(components, loras=[LoraSpec(str(tmp_path / "wide"))])
    components = load_components(ModelConfig())
    with pytest.raises(
        InputError, match=r"changes 'down_blocks.1.attentions.0.*which this model's UNet does not"
    ):
        Sampler(components, loras=[LoraSpec(str(tmp_path / "deep"))])


def test_generate_cli_lora(tiny_model_dir, lora_dir, tmp_path, capsys):
    from PIL import Image

    from pipelines.generate import main

    args = ["--model", str(tiny_model_dir), "--prompt", REQ.prompt, "--seed", "3", "--steps", "3"]
    args += ["--size", "32x32", "--guidance-scale", "5", "--scheduler", "ddim"]
    assert main([*args, "--lora", f"{lora_dir}:1", "--out", str(tmp_path / "x.png")]) == 0
    image = np.asarray(Image.open(tmp_path / "x.png"), np.float32) / 255
    np.testing.assert_allclose(image, _diffusers_image(tiny_model_dir, str(lora_dir))[0], atol=1 / 255 + 1e-6)

    (tmp_path / "empty").mkdir()
    assert main([*args, "--lora", str(tmp_path / "empty"), "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading progress bars
    assert err == f"error: LoRA {tmp_path / 'empty'}: no {WEIGHTS_FILE} (found: nothing)"
    assert not (tmp_path / "y.png").exists()


def test_sdray_export_of_a_lora_checkpoint_writes_the_ema_adapter(tmp_path):
    from safetensors.torch import load_file

    from pipelines.export import main
    from sdray.data.cache import CacheInfo
    from sdray.models.lora import INFO_FILE
    from sdray.train import checkpoint as ckpt
    from sdray.train.checkpoint import RunSpec

    lora = dataclasses.replace(LORA, kohya=True)
    cfg = TrainConfig(lora=lora, loss=LossConfig(prediction_type="epsilon"), ema_decay=0.5)
    state = build_state(cfg, ModelConfig(), torch.device("cpu"), rank=0)
    for _ in range(2):  # as after two steps (EMA warmup: the first one copies, the second averages)
        with torch.no_grad():
            for p in state.params:
                p.add_(0.01)
        state.ema.step(state.params)
    info = CacheInfo(
        vae_scaling_factor=0.18215,
        encoder_fingerprint="x",
        resolution=64,
        latent_shape=(4, 8, 8),
        text_embeds_shape=(77, 32),
    )
    (tmp_path / "ckpt").mkdir()
    ckpt.write_checkpoint_dir(tmp_path / "ckpt", state, RunSpec(train=cfg, model=ModelConfig(), info=info), 0)

    out = tmp_path / "adapter"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, KOHYA_FILE, INFO_FILE}
    exported = load_file(out / WEIGHTS_FILE)
    names = [n for n, p in state.unet.named_parameters() if p.requires_grad]  # the EMA's order
    for name, shadow, raw in zip(names, state.ema.shadow_params, state.params, strict=True):
        module, _, part = name.partition(".lora_")
        key = f"unet.{module}.lora.{'down' if part.startswith('A') else 'up'}.weight"
        assert torch.equal(exported[key], shadow) and not torch.equal(shadow, raw), name
    # an earlier adapter export is replaced (its marker is sdray_lora.yaml, not a model export's)
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--raw"]) == 0
    assert yaml.safe_load((out / INFO_FILE).read_text())["weights"] == "raw"
    exported = load_file(out / WEIGHTS_FILE)
    assert any(torch.equal(t, state.params[0]) for t in exported.values())
