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
    cfg = LossConfig(prediction_type="epsilon", snr_gamma=5.0)
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


# --- the orchestration's pieces, without Ray -------------------------------------------------------------


def test_prior_preservation_with_no_class_images_is_refused():
    from sdray.dreambooth.config import DreamBoothConfig
    from sdray.errors import ConfigError

    base = dict(instance_data="x", instance_prompt="a photo of sks dog", output="o")
    with pytest.raises(ConfigError, match="prior preservation with no class images.*num_class_images >= 1"):
        DreamBoothConfig(**base, class_prompt="a photo of a dog", num_class_images=0).check()
    with pytest.raises(ConfigError, match="prior preservation with no class images"):
        DreamBoothConfig(**base, num_class_images=5).check()  # no class prompt
    DreamBoothConfig(
        **base, num_class_images=0, prior_preservation=False
    ).check()  # plain fine-tuning is fine


def test_instance_folder_becomes_an_image_set_with_the_instance_prompt(tmp_path):
    import io
    import json

    from PIL import Image

    from sdray.dreambooth.config import DreamBoothConfig
    from sdray.dreambooth.run import class_prompt_lines, instance_table
    from sdray.errors import InputError

    for name in ("b.png", "sub/a.jpg"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), "red").save(buf, format="PNG" if name.endswith("png") else "JPEG")
        (tmp_path / "photos" / name).write_bytes(buf.getvalue())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    db = DreamBoothConfig(
        instance_data=str(tmp_path / "photos"), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", num_class_images=3, output="o",
    )  # fmt: skip
    table = instance_table(db, "image")
    assert table.column("id").to_pylist() == ["b.png", "sub/a.jpg"]
    assert set(table.column("caption").to_pylist()) == {"a photo of sks dog"}
    assert table.schema.field("image").type.get_field_index("bytes") == 0
    lines = [json.loads(x) for x in class_prompt_lines(db).decode().splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [("a photo of a dog", i) for i in range(3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        instance_table(
            DreamBoothConfig(instance_data=str(tmp_path / "empty"), instance_prompt="x", output="o"), "image"
        )


# --- training with prior preservation on real Ray Train -----------------------------------------------------


def _train_cfg(instance, klass, out, **overrides):
    from sdray.train.config import TrainConfig

    base = dict(
        data=str(instance), class_data=str(klass), output=str(out), batch_size=2, num_workers=2,
        grad_accum_steps=2, max_steps=3, checkpoint_every=3, log_every=3, validate_every=-1, export=False,
        shuffle_buffer=0, prior_loss_weight=0.5, learning_rate=1e-3,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


@pytest.mark.slow
def test_two_workers_pair_every_micro_batch_with_class_rows(ray_session, tiny_components, tmp_path):
    """With LoRA; the pairing does not depend on what trains (full fine-tuning DreamBooth runs in the docs
    chain, tests/test_docs_finetune.py)."""
    from cache_fixtures import write_test_cache

    from sdray.models.config import ModelConfig
    from sdray.train import checkpoint as ckpt
    from sdray.train.config import LoraConfig
    from sdray.train.metrics import read_metrics
    from sdray.train.run import run_training

    instance = write_test_cache(tmp_path / "instance", tiny_components, num_rows=8, rows_per_shard=8)
    klass = write_test_cache(tmp_path / "class", tiny_components, num_rows=24, rows_per_shard=12)
    cfg = _train_cfg(instance, klass, tmp_path / "run", lora=LoraConfig(enabled=True))
    result = run_training(cfg, ModelConfig())
    assert result.step == 3 and [r["step"] for r in read_metrics(cfg.output)] == [1, 2, 3]
    state = ckpt.read_shared_state(sorted((tmp_path / "run" / "ray" / "train").glob("checkpoint-*"))[-1])
    # 3 steps x 2 micro-batches = 6 items on each worker, each an (instance, class) pair of batch_size 2:
    # instance 8 rows / 2 workers = 2 batches an epoch -> epoch 2, batch 2; class 24 / 2 = 6 batches -> [0, 6]
    assert (state["epoch"], state["batches_in_epoch"]) == (2, 2)
    assert state["class_stream"] == [0, 6]
    assert state["lora"] is True and all(".lora_" in k for k in state["unet"])


@pytest.mark.slow
def test_empty_class_cache_is_refused_before_training(ray_session, tiny_components, tmp_path):
    from cache_fixtures import write_test_cache

    from sdray.errors import InputError
    from sdray.models.config import ModelConfig
    from sdray.train.run import run_training

    instance = write_test_cache(tmp_path / "instance", tiny_components, num_rows=8, rows_per_shard=8)
    empty = write_test_cache(tmp_path / "class", tiny_components, num_rows=0)
    with pytest.raises(InputError, match=r"prior preservation needs class images; train.class_data .*0 rows"):
        run_training(_train_cfg(instance, empty, tmp_path / "run"), ModelConfig())
    assert not (tmp_path / "run" / "ray").exists()


def test_instance_preprocessing_beside_class_generation_hands_back_errors_of_either_side():
    """run_dreambooth preprocesses the instance set on a thread while the class images are generated."""
    import threading

    from sdray.dreambooth.run import _beside
    from sdray.errors import InputError

    order: list[str] = []
    assert _beside(lambda: order.append("background") or 7, lambda: order.append("foreground")) == 7
    assert sorted(order) == ["background", "foreground"]

    def broken_instances() -> None:
        raise InputError("data/mine: no image survived preprocessing")

    with pytest.raises(InputError, match="no image survived"):  # raised once the foreground is done
        _beside(broken_instances, lambda: order.append("class images"))
    assert order[-1] == "class images"

    release = threading.Event()

    def broken_class_images() -> None:
        raise InputError("prior preservation with no class images")

    with pytest.raises(InputError, match="no class images"):  # at once: the background is not awaited
        _beside(release.wait, broken_class_images)
    release.set()
