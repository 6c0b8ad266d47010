"""Aspect-ratio buckets end to end: the ladder and assignment (pure), a bucketed cache read back with plain
pyarrow, a 2-worker run on three buckets of unequal size (equal steps per worker, resumed mid-epoch), and
non-square generation through the HTTP API of the exported model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.config import to_dict
from sdray.data import cache, rejects
from sdray.data.buckets import (
    beyond_limit,
    bucket_ladder,
    cover_crop,
    nearest_bucket,
    nearest_trained,
    size_multiple,
)
from sdray.data.synth import SynthConfig, write_synth
from sdray.errors import ConfigError
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.run import run_preprocess
from sdray.preprocess.stages import decode_batch
from sdray.train.bucket_batcher import epoch_plan, plan_summary, rank_plan

# synth WxH, drawn 3:2:1 -> buckets 64x64, 48x80, 80x48 (HxW) at resolution 64: 12, 6 and 4 of 22 rows
SIZES = ("64x64", "64x64", "64x64", "96x64", "96x64", "64x96")
BUCKET_CFG = [
    "preprocess.buckets=true",
    "preprocess.bucket_step=16",
    "preprocess.decode_batch_size=8",
    "preprocess.encode_batch_size=8",
    "preprocess.store_std=true",
]


# ---- the ladder and assignment (pure) ----


def test_ladder_has_about_the_square_area_and_step_multiples():
    ladder = bucket_ladder(512, 64, 2.0)
    assert ladder == ((640, 384), (576, 448), (512, 512), (448, 576), (384, 640))
    big = bucket_ladder(1024, 64, 4.0)
    assert (1024, 1024) in big and (512, 2048) in big and len(set(big)) == len(big)
    for h, w in big:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) / min(h, w) <= 4
        assert h * w >= 0.85 * 1024**2  # rounded down to the step, never far below the square's area
    assert bucket_ladder(64, 16, 2.0) == ((80, 48), (64, 64), (48, 80))
    assert size_multiple(8, 4) == 64 and size_multiple(8, 2) == 16


def test_assignment_is_nearest_aspect_and_cover_crop_keeps_the_centre():
    ladder = bucket_ladder(512, 64, 2.0)
    assert nearest_bucket(1080, 1920, ladder) == (384, 640)  # 16:9 landscape -> the widest
    assert nearest_bucket(1000, 1000, ladder) == (512, 512)
    assert nearest_bucket(1300, 1000, ladder) == (576, 448)  # 1.3 tall: 576/448 = 1.29
    assert nearest_bucket(4000, 1000, ladder) == (640, 384)
    assert beyond_limit(4000, 1000, 2.0) and not beyond_limit(1000, 2000, 2.0)
    plan = cover_crop(1080, 1920, (384, 640))
    assert plan.resized == (384, 683) and plan.box == (21, 0, 661, 384)
    assert plan.original_box == (59, 0, 1858, 1080)  # in source pixels: a strip off each side
    assert plan.kept_share == pytest.approx(640 / 683, abs=1e-3)
    assert cover_crop(1080, 1920, (512, 512)).kept_share == pytest.approx(1080 / 1920, abs=1e-2)
    assert nearest_trained(64, 96, ((48, 80), (64, 64)), 0.25) == (48, 80)
    assert nearest_trained(32, 128, ((48, 80), (64, 64)), 0.25) is None


def test_epoch_plan_equal_per_rank_nothing_dropped_and_seeded():
    counts = {"48x80": 3, "64x64": 9, "80x48": 1}  # one bucket smaller than a batch
    plan = epoch_plan(counts, 4, 2, seed=0, epoch=0)
    per_rank = [rank_plan(plan, r, 2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 1 + 3 + 1 batches, one added for equal ranks
    seen = {name: set() for name in counts}
    for name, rows in plan:
        assert len(rows) == 4 and rows.max() < counts[name]
        seen[name] |= set(rows.tolist())
    assert all(seen[name] == set(range(n)) for name, n in counts.items())  # every row of every bucket
    assert [(n, r.tolist()) for n, r in plan] == [
        (n, r.tolist()) for n, r in epoch_plan(counts, 4, 2, seed=0, epoch=0)
    ]
    assert [n for n, _ in plan] != [n for n, _ in epoch_plan(counts, 4, 2, seed=0, epoch=1)] or [
        r.tolist() for _, r in plan
    ] != [r.tolist() for _, r in epoch_plan(counts, 4, 2, seed=0, epoch=1)]
    summary = plan_summary(counts, 4, 2)
    assert summary["repeated"] == ["48x80", "64x64", "80x48"] and summary["smaller_than_a_batch"] == [
        "48x80",
        "80x48",
    ]
    assert summary["buckets"]["80x48"] == {"rows": 1, "batches": 1, "repeated_rows": 3}
    assert (
        summary["batches_added_for_equal_ranks"] == 1 and summary["micro_batches_per_worker_per_epoch"] == 3
    )


def test_batcher_resumes_exactly_mid_epoch():
    from types import SimpleNamespace

    import torch

    from sdray.train.bucket_batcher import BucketStore, bucket_micro_batches

    counts = {"48x80": 5, "64x64": 7, "80x48": 2}
    store = BucketStore(
        {
            name: {cache.LATENT: np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1) + 100 * k}
            for k, (name, n) in enumerate(counts.items())
        }
    )
    cfg = SimpleNamespace(batch_size=2, seed=3)

    def run(state, n):
        batches = bucket_micro_batches(store, cfg, state, 1, 2, torch.device("cpu"))
        return [next(batches)[cache.LATENT].flatten().tolist() for _ in range(n)]

    whole = run(SimpleNamespace(epoch=0, batches_in_epoch=0), 9)  # 8 batches: 4 a rank; 9 cross two epochs
    assert all(len({int(v) // 100 for v in b}) == 1 for b in whole)  # one bucket (shape) per batch
    state = SimpleNamespace(epoch=0, batches_in_epoch=0)
    head = run(state, 3)
    assert (state.epoch, state.batches_in_epoch) == (0, 3)
    resumed = SimpleNamespace(epoch=state.epoch, batches_in_epoch=state.batches_in_epoch)  # from a checkpoint
    assert head + run(resumed, 6) == whole and (resumed.epoch, resumed.batches_in_epoch) == (2, 1)


def test_far_sizes_are_refused_with_the_list_or_warned_by_config(caplog):
    from sdray.serve.config import ServeConfig
    from sdray.serve.request import GenerationRequest, ModelInfo, check_request

    info = ModelInfo(source="m", native_size=64, size_multiple=8, max_tokens=77, buckets=((48, 80), (64, 64)))

    def problems(width, height, **cfg):
        req = GenerationRequest("a cat", (0,), width, height, 2, 1.0, "ddim")
        return check_request(req, info, ServeConfig(**cfg), lambda text: 3)

    assert problems(80, 48) == [] and problems(96, 64) == []  # a bucket, and near one
    assert problems(128, 32) == [
        ("size", "128x32 is far from the sizes this model was trained at (80x48, 64x64); ask for one of them, "
                 "or set serve.off_bucket: warn")
    ]  # fmt: skip
    assert problems(128, 32, off_bucket="warn") == [] and "128x32 is far from" in caplog.text
    assert check_request(GenerationRequest("a", (0,), 128, 32, 2, 1.0, "ddim"), ModelInfo(
        source="m", native_size=64, size_multiple=8, max_tokens=77), ServeConfig(), lambda t: 3) == []  # fmt: skip


def test_trained_buckets_are_the_ladder_buckets_that_held_rows(tmp_path):
    import yaml

    from sdray.models.config import TRAIN_INFO_FILE
    from sdray.serve.buckets import trained_buckets

    ladder = [[80, 48], [64, 64], [48, 80]]
    only_square = {"buckets": ladder, "bucket_counts": {"64x64": 12000, "80x48": 0}}
    (tmp_path / TRAIN_INFO_FILE).write_text(yaml.safe_dump({"cache_info": only_square}))
    assert trained_buckets(str(tmp_path)) == ((64, 64),)  # a square-only data set trained no wide bucket
    (tmp_path / TRAIN_INFO_FILE).write_text(yaml.safe_dump({"cache_info": {"buckets": ladder}}))
    assert trained_buckets(str(tmp_path)) == ((80, 48), (64, 64), (48, 80))  # no counts recorded: the ladder


def test_bucket_config_is_validated():
    with pytest.raises(ConfigError, match="bucket_step"):
        PreprocessConfig(resolution=64, buckets=True, bucket_step=12)
    with pytest.raises(ConfigError, match="bucket_max_aspect"):
        PreprocessConfig(bucket_max_aspect=0.5)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_stage_crops_into_buckets_or_rejects_beyond_the_limit():
    table = pa.table({
        "id": ["wide", "tall", "square", "extreme"],
        "image": [_png(96, 64), _png(64, 96), _png(70, 70), _png(200, 64)],
        "caption": ["a"] * 4,
        "path": ["in.parquet"] * 4,
    })  # fmt: skip
    model = json.dumps(to_dict(ModelConfig()))
    pre = PreprocessConfig(resolution=64, buckets=True, bucket_step=16, bucket_over_limit="reject")
    batch = decode_batch(table, cfg=to_dict(pre), model_json=model)
    assert batch["reason"].tolist() == ["", "", "", rejects.ASPECT_OVER_LIMIT]
    assert batch[cache.BUCKET_H][:3].tolist() == [48, 80, 64] and batch[cache.BUCKET_W][:3].tolist() == [
        80,
        48,
        64,
    ]
    assert batch[cache.ORIGINAL_SIZE][:3].tolist() == [[64, 96], [96, 64], [70, 70]]
    assert batch[cache.CROP_BOX][0].tolist() == [0, 2, 96, 60]  # full width, a strip off top and bottom
    assert batch["pixels"].shape == (4, 3 * 64 * 64)
    wide = batch["pixels"][0, : 3 * 48 * 80].reshape(3, 48, 80)
    assert wide[:, 10, 10].tolist() == [200, 10, 10] and not batch["pixels"][0, 3 * 48 * 80 :].any()
    cropped = decode_batch(table, cfg=to_dict(PreprocessConfig(**{**to_dict(pre), "bucket_over_limit": "crop"})),
                           model_json=model)  # fmt: skip
    assert cropped["reason"][3] == "" and (cropped[cache.BUCKET_H][3], cropped[cache.BUCKET_W][3]) == (48, 80)


# ---- preprocess -> cache -> train (2 workers) -> serve, on real Ray ----


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """22 scenes in three sizes: three buckets of unequal size."""
    cfg = SynthConfig(num_images=22, resolution=64, rows_per_shard=11, aspect_sizes=SIZES)
    return write_synth(cfg, tmp_path_factory.mktemp("buckets") / "data")


@pytest.fixture(scope="module")
def bucket_cache(ray_session, mixed_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("buckets") / "cache"
    cfg = load_pipeline_config(
        "tiny", [f"preprocess.input={mixed_data}", f"preprocess.output={out}", *BUCKET_CFG]
    )
    return out, run_preprocess(cfg)


def test_cache_lists_buckets_and_rows_read_back_with_plain_pyarrow(bucket_cache, mixed_data):
    out, summary = bucket_cache
    sizes = pq.read_table(mixed_data, columns=["image"]).column("image").to_pylist()
    expected: dict[str, int] = {}
    for item in sizes:
        w, h = Image.open(io.BytesIO(item["bytes"])).size
        label = {(64, 64): "64x64", (96, 64): "48x80", (64, 96): "80x48"}[(w, h)]
        expected[label] = expected.get(label, 0) + 1
    assert expected == {"64x64": 12, "48x80": 6, "80x48": 4}  # three buckets of unequal size
    info = json.loads((out / cache.INFO_FILE).read_text())
    assert info["format_version"] == 2 and info["buckets"] == [[80, 48], [64, 64], [48, 80]]
    assert info["bucket_counts"] == dict(sorted(expected.items())) == summary["buckets"]
    table = pq.read_table(out)  # plain pyarrow, the whole cache at once: one schema for every bucket
    assert table.num_rows == 22 and table.schema.field(cache.LATENT).type == pa.list_(pa.float16())
    latents = table.column(cache.LATENT).to_pylist()
    for k, row in enumerate(table.select([cache.BUCKET_H, cache.BUCKET_W, cache.ORIGINAL_SIZE]).to_pylist()):
        h, w = row[cache.BUCKET_H], row[cache.BUCKET_W]
        latent = np.asarray(latents[k], np.float32).reshape(4, h // 8, w // 8)  # per-row shape
        assert np.isfinite(latent).all() and latent.std() > 0
        assert (h > w) == (row[cache.ORIGINAL_SIZE][0] > row[cache.ORIGINAL_SIZE][1])
    for shard in out.glob("part-*.parquet"):  # one bucket per shard, named by it
        one = pq.read_table(shard, columns=[cache.BUCKET_H, cache.BUCKET_W])
        assert len(set(zip(one.column(0).to_pylist(), one.column(1).to_pylist(), strict=True))) == 1
        assert f"-{one.column(0)[0]}x{one.column(1)[0]}-" in shard.name


def test_format_1_cache_still_reads_and_unknown_version_says_what_to_do(tmp_path):
    old = {**json.loads(cache.CacheInfo(vae_scaling_factor=0.18, encoder_fingerprint="x", resolution=64,
                                        latent_shape=(4, 8, 8), text_embeds_shape=(77, 32)).to_json())}  # fmt: skip
    for key in ("buckets", "bucket_counts"):
        old.pop(key)
    info = cache.CacheInfo.from_json(json.dumps({**old, "format_version": 1}), where="old")
    assert info.buckets == () and info.latent_shape == (4, 8, 8)
    with pytest.raises(Exception, match="re-run `sdray preprocess` into a new output directory"):
        cache.CacheInfo.from_json(json.dumps({**old, "format_version": 9}), where="future")


STEPS, MID = 6, 2  # batches of 5: 3 + 2 + 1 per epoch (every bucket repeats rows) -> 3 steps a worker


def _train_cfg(cache_dir: Path, out: Path, steps: int):
    from sdray.train.config import TrainConfig

    return TrainConfig(
        data=str(cache_dir), output=str(out), num_workers=2, batch_size=5, max_steps=steps, learning_rate=1e-3,
        lr_schedule="constant", checkpoint_every=100, log_every=100, validate_every=-1, ema_decay=0.99,
        export=steps == STEPS,  # only the final run exports (for the serve test)
    )  # fmt: skip


@pytest.fixture(scope="module")
def bucket_run(bucket_cache, tmp_path_factory):
    """Two workers: stop at step 2 (mid-epoch), then the same command to step 6 resumes from there."""
    from sdray.train.run import run_training

    cache_dir, _ = bucket_cache
    out = tmp_path_factory.mktemp("buckets") / "train"
    first = run_training(_train_cfg(cache_dir, out, MID), ModelConfig())
    second = run_training(_train_cfg(cache_dir, out, STEPS), ModelConfig())
    return out, first, second


def test_two_workers_three_buckets_equal_steps_and_mid_epoch_resume(bucket_run):
    from sdray.train import checkpoint as ckpt
    from sdray.train.metrics import read_metrics

    out, first, second = bucket_run
    assert first.step == MID and second.step == STEPS  # no hang: both fits returned
    summary = json.loads((out / "buckets.json").read_text())
    assert (
        summary["micro_batches_per_worker_per_epoch"] == 3 and summary["batches_added_for_equal_ranks"] == 0
    )
    assert summary["repeated"] == ["48x80", "64x64", "80x48"] and summary["smaller_than_a_batch"] == ["80x48"]
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # resumed at batch 2 of epoch 0 (a restart at batch 0 would make steps 3-5 epoch 0)
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in rows)
    final = sorted((out / "ray" / "train").glob("checkpoint-step-*"))[-1]
    state = ckpt.read_shared_state(final)
    assert state["resumes"] == 1 and (state["epoch"], state["batches_in_epoch"]) == (1, 3)
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in final.iterdir()}
    trained = ckpt.read_spec(final).info.buckets
    assert trained == ((80, 48), (64, 64), (48, 80))


def test_exported_model_serves_its_buckets_over_http(bucket_run):
    import httpx
    from serve_fixtures import decode_png, free_port, running_app

    from sdray.serve.config import ServeConfig

    out, _, second = bucket_run
    cfg = ServeConfig(port=free_port(), max_batch_size=2, batch_wait_timeout_s=0.01, default_steps=2)
    with (
        running_app(cfg, ModelConfig(path=second.model)) as base,
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        card = c.get("/v1/models").json()["data"][0]
        assert card["buckets"] == ["48x80", "64x64", "80x48"]  # WxH, as requests spell sizes
        for size in ("80x48", "48x80", "96x64"):  # two trained buckets, and one near a bucket
            r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": size, "seed": 1})
            assert r.status_code == 200, r.text
            width, height = (int(v) for v in size.split("x"))
            assert decode_png(r.json()["data"][0]["b64_json"]).shape == (height, width, 3)
        far = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "128x32"})
        assert far.status_code == 422
        assert "128x32 is far from the sizes this model was trained at (48x80, 64x64, 80x48)" in far.text


def test_bucketed_demo_config_is_the_demo_plus_buckets():
    """demo_buckets.yaml must not drift from demo.yaml: only the bucket settings differ."""
    bucket_sets = [
        "synth.aspect_sizes=[64x64, 96x64, 64x96]",
        "preprocess.buckets=true",
        "preprocess.bucket_step=16",
        "train.loader=auto",
    ]
    assert load_pipeline_config("demo_buckets") == load_pipeline_config("demo", bucket_sets)
