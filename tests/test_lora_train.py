"""LoRA training on a real local Ray: 1 worker, then a restart with 2 DDP workers that resumes the adapter,
its optimizer state and its EMA from the checkpoint; the export loads in real diffusers like in sdray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cache_fixtures import write_test_cache

from sdray.models.config import ModelConfig
from sdray.models.lora import INFO_FILE, WEIGHTS_FILE, LoraSpec
from sdray.train import checkpoint as ckpt
from sdray.train.config import LoraConfig, TrainConfig
from sdray.train.metrics import read_metrics
from sdray.train.run import run_training

pytestmark = pytest.mark.slow  # two Ray Train runs

FIRST, TOTAL = 6, 10
ADAPTER_TENSORS = 2 * 4 * 8  # A and B of to_q, to_k, to_v, to_out.0 in the tiny UNet's 8 attention blocks


@pytest.fixture(scope="module")
def lora_run(ray_session, tiny_components, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    cache = write_test_cache(root / "cache", tiny_components, num_rows=32, rows_per_shard=16)
    cfg = TrainConfig(
        data=str(cache),
        output=str(root / "run"),
        batch_size=4,
        max_steps=FIRST,
        learning_rate=1e-2,
        snr_gamma=5.0,
        caption_dropout=0.1,
        checkpoint_every=3,
        log_every=3,
        shuffle_buffer=8,
        validate_every=-1,
        validation_steps=2,
        ema_decay=0.9,
        export=False,
        lora=LoraConfig(enabled=True, rank=4, alpha=8.0),
    )
    run_training(cfg, ModelConfig())
    # The same command again with 2 workers, 2 micro-batches each and more steps: resumes at step 7.
    cfg = dataclasses.replace(
        cfg,
        max_steps=TOTAL,
        num_workers=2,
        grad_accum_steps=2,
        export=True,
        validate_every=0,  # grid at the end
    )
    return cfg, run_training(cfg, ModelConfig())


def test_resumed_two_worker_run_trains_and_checkpoints_only_the_adapter(lora_run):
    cfg, result = lora_run
    out = Path(cfg.output)
    assert [r["step"] for r in read_metrics(cfg.output)] == list(range(1, TOTAL + 1))
    assert result.step == TOTAL and result.model is None and result.lora == str(out / "lora")
    final = Path(result.checkpoint)
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in final.iterdir()}
    state = ckpt.read_shared_state(final)
    assert state["lora"] is True and state["resumes"] == 1
    assert len(state["unet"]) == ADAPTER_TENSORS and all(".lora_" in k for k in state["unet"])
    # Optimizer and EMA carried over the restart: 10 updates each, not 4.
    adam = state["optimizer"]["state"]
    assert len(adam) == ADAPTER_TENSORS and {int(s["step"]) for s in adam.values()} == {TOTAL}
    assert len(state["ema"]["shadow_params"]) == ADAPTER_TENSORS
    assert state["ema"]["optimization_step"] == TOTAL
    unet_bytes = sum(p.numel() * 4 for p in _tiny_unet().parameters())
    assert (final / ckpt.STATE_FILE).stat().st_size < 0.1 * unet_bytes  # no frozen weights in it
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == [f"step-{TOTAL:08d}.png"]  # sampled with the EMA adapter on the frozen base


def _tiny_unet(lora: LoraConfig | None = None):
    from sdray.models.components import load_components
    from sdray.train.lora import add_adapter

    unet = load_components(ModelConfig(), ["unet"]).unet
    if lora is not None:
        add_adapter(unet, lora, seed=0)
    return unet


def _diffusers_key(peft_name: str) -> str:
    """``<module>.lora_A.default.weight`` -> ``unet.<module>.lora.down.weight`` (B: ``lora.up``)."""
    module, _, part = peft_name.partition(".lora_")
    return f"unet.{module}.lora.{'down' if part.startswith('A') else 'up'}.weight"


def test_export_holds_the_ema_adapter_and_diffusers_gives_sdrays_image(lora_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from sdray.models.components import load_components
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler, make_scheduler

    cfg, result = lora_run
    lora_dir = Path(result.lora)
    info = yaml.safe_load((lora_dir / INFO_FILE).read_text())
    assert (info["step"], info["weights"], info["base_model"]) == (
        TOTAL,
        "ema",
        "preset:tiny (random init, seed 0)",
    )
    exported = load_file(lora_dir / WEIGHTS_FILE)
    shadow = ckpt.read_shared_state(Path(result.checkpoint))["ema"]["shadow_params"]
    names = [n for n, p in _tiny_unet(cfg.lora).named_parameters() if p.requires_grad]  # the EMA's order
    assert len(exported) == len(shadow) == ADAPTER_TENSORS
    for name, value in zip(names, shadow, strict=True):
        assert torch.equal(exported[_diffusers_key(name)], value), name

    req = GenerationRequest(
        prompt="a large blue square",
        seeds=(4,),
        width=64,
        height=64,
        steps=3,
        guidance_scale=4.0,
        scheduler="ddim",
    )
    torch.set_num_threads(1)
    sampler = Sampler(load_components(ModelConfig(path=str(tiny_model_dir))), loras=[LoraSpec(str(lora_dir))])
    ours = sampler.sample([req], [4])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, height=64, width=64, output_type="np")
    base = pipe(req.prompt, generator=torch.Generator().manual_seed(4), **kwargs).images
    pipe.load_lora_weights(str(lora_dir))
    theirs = pipe(req.prompt, generator=torch.Generator().manual_seed(4), **kwargs).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.abs(theirs - base).max() > 1e-3  # the trained adapter changes the image
