"""Stage 1 on real local Ray with the tiny model: values, metadata, rejects, resume, refusal, the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_plan import remote_args_by_op
from PIL import Image

from sdray import allocator
from sdray.config import to_dict
from sdray.data import cache, rejects
from sdray.data.cache import MANIFEST_DIR, SUMMARY_FILE
from sdray.data.reader import read_parquet_files
from sdray.errors import ConfigError, InputError
from sdray.models.components import load_components, save_components
from sdray.models.config import ModelConfig
from sdray.models.fingerprint import encoder_fingerprint
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess import dataset
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.dataset import read_tasks
from sdray.preprocess.inputs import resolve_inputs, unit_key
from sdray.preprocess.manifest import OutputDir
from sdray.preprocess.run import cache_info, run_preprocess
from sdray.preprocess.stages import decode_batch

FAST = ["preprocess.decode_batch_size=8", "preprocess.encode_batch_size=8", "preprocess.store_std=true"]


def config(input_, output, *overrides: str):
    return load_pipeline_config(
        "tiny", [f"preprocess.input={input_}", f"preprocess.output={output}", *FAST, *overrides]
    )


def read_cache(out: Path) -> dict[str, dict]:
    """id -> row (tensors reshaped via CacheInfo), read with plain pyarrow; fails on duplicate ids."""
    info = cache.read_cache_info(out)
    table = pq.read_table(out)  # pyarrow skips the _sidecars
    ids = table.column(cache.ID).to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    tensors = {
        name: table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, *shape)
        for name, shape in cache.tensor_columns(info).items()
    }
    captions = table.column(cache.CAPTION).to_pylist()
    return {i: {"caption": captions[k], **{n: t[k] for n, t in tensors.items()}} for k, i in enumerate(ids)}


def assert_same_rows(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for row_id in a:
        assert a[row_id]["caption"] == b[row_id]["caption"]
        for name in (cache.LATENT, cache.LATENT_STD, cache.TEXT_EMBEDS):
            np.testing.assert_allclose(a[row_id][name], b[row_id][name], atol=2e-3, rtol=2e-3, err_msg=row_id)


@pytest.fixture(scope="module")
def synth_cache(ray_session, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "synth"
    return out, run_preprocess(config(synth_dir, out))


def test_synth_cache_matches_encoders(synth_cache, synth_dir, tiny_components):
    out, summary = synth_cache
    assert (summary["rows_in"], summary["rows_written"], summary["rows_rejected"]) == (64, 64, 0)
    assert summary["this_run"]["rows_in"] == 64 and summary["this_run"]["images_per_s"] > 0
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    info = cache.read_cache_info(out)
    assert info.resolution == 64 and info.latent_shape == (4, 8, 8) and info.text_embeds_shape == (77, 32)
    assert info.has_std and info.vae_scaling_factor == pytest.approx(0.18215)
    assert info.encoder_fingerprint == encoder_fingerprint(tiny_components)
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) >= 2  # one input file per shard at least: synth_dir has two
    assert all(cache.read_shard_info(s) == info for s in shards)
    assert pq.read_schema(shards[0]).field(cache.LATENT).type.value_type == pa.float16()

    rows = read_cache(out)
    source = pq.read_table(synth_dir).to_pylist()
    assert sorted(rows) == sorted(r["id"] for r in source)
    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")) for r in source]
    )
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (64, 3, 64, 64) in [-1, 1]
    tok = tiny_components.tokenizer
    ids = tok(
        [r["caption"] for r in source], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        posterior = tiny_components.vae.encode(x).latent_dist  # unscaled: no scaling factor applied
        text = tiny_components.text_encoder(ids).last_hidden_state
        empty = tiny_components.text_encoder(
            tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        )
    for k, r in enumerate(source):
        row = rows[r["id"]]
        assert row["caption"] == r["caption"] and row[cache.LATENT].dtype == np.float16
        np.testing.assert_allclose(row[cache.LATENT], posterior.mean[k].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(row[cache.LATENT_STD], posterior.std[k].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(row[cache.TEXT_EMBEDS], text[k].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cache.read_empty_caption(out), empty.last_hidden_state[0].numpy(), atol=2e-3)


def test_rerun_does_nothing_and_other_model_is_refused(synth_cache, synth_dir):
    out, _ = synth_cache
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    summary = run_preprocess(config(synth_dir, out))
    assert summary["this_run"]["input_files"] == 0 and summary["rows_written"] == 64
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before
    with pytest.raises(ConfigError, match=r"resolution: cache has 64, now 128.*new output directory"):
        run_preprocess(config(synth_dir, out, "preprocess.resolution=128"))
    with pytest.raises(ConfigError, match="encoder_fingerprint"):
        run_preprocess(config(synth_dir, out, "model.seed=1"))
    with pytest.raises(ConfigError, match="has_std: cache has True, now False"):
        run_preprocess(config(synth_dir, out, "preprocess.store_std=false"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bad_corpus(folder: Path) -> dict[str, str]:
    """Input files (one empty) covering every reject reason; returns id -> expected reason ("" = written)."""
    rng = np.random.default_rng(0)
    good = encoded(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    corrupt = bytearray(good)
    corrupt[200:260] = bytes(b ^ 0xFF for b in corrupt[200:260])
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6
    rows = {  # id: (image bytes, caption, expected reason)
        "rgb": (good, "a photo", ""),
        "rgba": (encoded(Image.new("RGBA", (64, 80), (9, 9, 9, 128))), "a photo", ""),
        "palette": (encoded(palette, transparency=0), "a photo", ""),
        "cmyk": (encoded(Image.new("CMYK", (70, 64), (0, 255, 0, 0)), "JPEG"), "a photo", ""),
        "grey16": (encoded(Image.fromarray(np.full((64, 64), 40000, np.uint16))), "a photo", ""),
        "exif": (encoded(Image.new("RGB", (96, 64), "red"), "JPEG", exif=exif), "a photo", ""),
        "wide": (encoded(Image.new("RGB", (200, 100), "blue")), "a photo", ""),
        "long": (good, "a photo of " + "a very red circle " * 20, ""),  # 84 words: truncated to 77 tokens
        "corrupt": (bytes(corrupt), "a photo", rejects.CORRUPT),
        "truncated": (good[: len(good) // 2], "a photo", rejects.TRUNCATED),
        "zero": (b"", "a photo", rejects.EMPTY_IMAGE),
        "null": (None, "a photo", rejects.MISSING_IMAGE),
        "text": (b"<html>not an image</html>", "a photo", rejects.NOT_AN_IMAGE),
        "tiny": (encoded(Image.new("RGB", (16, 16))), "a photo", rejects.TOO_SMALL),
        "bomb": (encoded(Image.new("L", (2000, 2000))), "a photo", rejects.TOO_LARGE),
        "nocap": (good, None, rejects.MISSING_CAPTION),
        "blank": (good, "   ", rejects.EMPTY_CAPTION),
        "nan": (good, "a zebra", rejects.NONFINITE_OUTPUT),  # the poisoned token, see poisoned_model
        None: (good, "a photo", rejects.MISSING_ID),
    }
    pq.write_table(
        pa.table({
            "key": list(rows),
            "jpg": pa.array([v[0] for v in rows.values()], pa.binary()),
            "txt": pa.array([v[1] for v in rows.values()], pa.string()),
        }),
        folder / "a.parquet",
    )  # fmt: skip
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "jpg": pa.array([], pa.binary()),
                             "txt": pa.array([], pa.string())}), folder / "c-empty.parquet")  # fmt: skip
    return {k: v[2] for k, v in rows.items()}


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory) -> Path:
    """The tiny model whose text encoder embeds the token "zebra" as inf: that caption's output is NaN."""
    components = load_components(ModelConfig())
    zebra = components.tokenizer("zebra").input_ids[1]
    with torch.no_grad():
        components.text_encoder.get_input_embeddings().weight[zebra] = float("inf")
    return save_components(components, tmp_path_factory.mktemp("models") / "poisoned")


def test_bad_rows_are_rejected_with_reasons_and_counted(ray_session, poisoned_model, tmp_path):
    (tmp_path / "in").mkdir()
    expected = bad_corpus(tmp_path / "in")
    assert set(expected.values()) == {"", *rejects.REASONS}
    cfg = config(
        tmp_path / "in",
        tmp_path / "out",
        f"model.path={poisoned_model}",
        "preprocess.id_column=key",
        "preprocess.image_column=jpg",
        "preprocess.caption_column=txt",
        "preprocess.min_image_side=32",
        "preprocess.max_image_pixels=1000000",
        "preprocess.rows_per_shard=4",
        "preprocess.decode_batch_size=4",
    )
    summary = run_preprocess(cfg)
    assert summary["input_files"] == 2 and summary["rows_in"] == len(expected)
    assert summary["rows_written"] + summary["rows_rejected"] == summary["rows_in"]
    assert summary["rejected_by_reason"] == dict(sorted(Counter(r for r in expected.values() if r).items()))
    assert summary["long_captions"] == 1  # "long"; the other written captions fit the 77-token window
    logged = OutputDir(str(tmp_path / "out")).read_rejects()
    assert {r["id"]: r["reason"] for r in logged} == {k: v for k, v in expected.items() if v}
    assert all(r["input"].endswith("a.parquet") for r in logged)
    rows = read_cache(tmp_path / "out")
    assert sorted(rows) == sorted(k for k, v in expected.items() if not v)
    assert all(np.isfinite(r[cache.TEXT_EMBEDS]).all() for r in rows.values())
    assert all(np.isfinite(r[cache.LATENT]).all() for r in rows.values())


def test_missing_column_names_column_and_file(synth_dir, tmp_path, capsys):
    with pytest.raises(InputError, match=r"part-00000.parquet: no caption column 'text'"):
        run_preprocess(config(synth_dir, tmp_path / "out", "preprocess.caption_column=text"))
    assert not (tmp_path / "out").exists()  # checked before anything is written: no skeleton cache
    from pipelines.preprocess import main

    code = main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: input ")


def test_decode_stage_on_hugging_face_layout():
    """The {bytes, path} image struct and list captions, through the CPU stage function itself."""
    good = encoded(Image.new("RGB", (80, 64), (255, 0, 0)))
    rows = {  # id: (image, captions, expected reason)
        "list-good": ({"bytes": good, "path": "x.png"}, ["", "a cat"], ""),
        "list-blank": ({"bytes": good, "path": "x.png"}, [" ", ""], rejects.EMPTY_CAPTION),
        "list-empty": ({"bytes": good, "path": "x.png"}, [], rejects.MISSING_CAPTION),
        "list-null": ({"bytes": good, "path": "x.png"}, None, rejects.MISSING_CAPTION),
        "struct-null": (None, ["a cat"], rejects.MISSING_IMAGE),
        "struct-nobytes": ({"bytes": None, "path": "x.png"}, ["a cat"], rejects.MISSING_IMAGE),
    }
    table = pa.table({
        "id": list(rows),
        "image": pa.array([v[0] for v in rows.values()], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "caption": pa.array([v[1] for v in rows.values()], pa.list_(pa.string())),
        "path": ["in.parquet"] * len(rows),
    })  # fmt: skip
    pre = PreprocessConfig(resolution=32)
    batch = decode_batch(table, cfg=to_dict(pre), model_json=json.dumps(to_dict(ModelConfig())))
    assert dict(zip(batch["id"], batch["reason"], strict=True)) == {k: v[2] for k, v in rows.items()}
    assert batch["caption"][0] == "a cat" and batch["unit"][0] == "in.parquet"
    assert batch["pixels"].shape == (6, 3, 32, 32) and batch["pixels"][0, :, 5, 5].tolist() == [255, 0, 0]
    assert batch["input_ids"][0, :4].tolist() == [49406, 320, 2368, 49407]  # "a cat"
    assert not batch["input_ids"][1:].any()  # rejected rows are not tokenized


def split_input(source: Path, folder: Path, rows_per_file: int) -> None:
    folder.mkdir()
    table = pq.read_table(source)
    for k in range(0, table.num_rows, rows_per_file):
        pq.write_table(table.slice(k, rows_per_file), folder / f"f{k:04d}.parquet")


def test_read_tasks_pack_small_files_only():
    assert read_tasks([64] * 64, rows_per_task=512, min_tasks=8) == 8  # 8 files a task
    assert read_tasks([64] * 64, rows_per_task=512, min_tasks=16) == 16  # never below the floor
    assert read_tasks([1000] * 5, rows_per_task=512, min_tasks=8) == 5  # large files: one task each
    assert read_tasks([4] * 3, rows_per_task=512, min_tasks=8) == 3  # never more tasks than files
    assert read_tasks([], rows_per_task=512, min_tasks=8) == 0


@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_encoder_actors_start_with_the_configured_allocator(
    ray_session, synth_dir, tiny_components, tmp_path, choice
):
    cfg = config(synth_dir, tmp_path / "out", f"preprocess.encode_allocator={choice}")
    fs, files = resolve_inputs(str(synth_dir))
    ds = dataset.build_dataset(
        cfg,
        fs=fs,
        paths=[f.path for f in files],
        rows=[32] * len(files),
        out=OutputDir(str(tmp_path / "out")),
        info=cache_info(tiny_components, cfg),
    )
    ops = remote_args_by_op(ds)  # the plan as built, before anything runs
    assert ops["MapBatches(Encoder)"]["runtime_env"] == {"env_vars": allocator.worker_env(choice)}
    assert "runtime_env" not in ops["MapBatches(decode_batch)"]  # only the model-running actors


def test_crashed_run_resumes_to_the_uninterrupted_rows(synth_cache, synth_dir, monkeypatch, tmp_path):
    """The driver dies after committing 5 of 16 input files (Ray tasks still in flight); the same command
    run again gives exactly the rows of the uninterrupted run, with no duplicates and no leftovers. The
    files are read two to a task (4 rows each, 8 rows a shard): still committed and sharded file by file."""
    split_input(synth_dir, tmp_path / "in", rows_per_file=4)  # 16 input files
    out = tmp_path / "out"
    cfg = config(tmp_path / "in", out, "preprocess.encode_batch_size=2", "preprocess.rows_per_shard=8")
    planned = []

    def recording_reader(paths, **kwargs):
        planned.append((len(paths), kwargs["tasks"]))
        return read_parquet_files(paths, **kwargs)

    monkeypatch.setattr(dataset, "read_parquet_files", recording_reader)
    commit = OutputDir.commit

    def crash_after_five(self, key, record, rejected_rows):
        if len(list((out / MANIFEST_DIR).glob("*.json"))) == 5:
            raise KeyboardInterrupt("injected crash")
        commit(self, key, record, rejected_rows)

    monkeypatch.setattr(OutputDir, "commit", crash_after_five)
    with pytest.raises(KeyboardInterrupt, match="injected crash"):
        run_preprocess(cfg)
    monkeypatch.setattr(OutputDir, "commit", commit)
    assert len(list((out / MANIFEST_DIR).glob("*.json"))) == 5
    # Leftovers a kill can leave at any moment: a shard of an unfinished file, a write cut off mid-way.
    done = {p.stem for p in (out / MANIFEST_DIR).glob("*.json")}
    unfinished = next(
        k for k in (unit_key(str(p)) for p in sorted((tmp_path / "in").iterdir())) if k not in done
    )
    shutil.copy(next(synth_cache[0].glob("part-*.parquet")), out / f"part-{unfinished}-{'0' * 16}.parquet")
    # An orphan: a shard of a finished file that its manifest record does not list (a retried write task).
    shutil.copy(next(synth_cache[0].glob("part-*.parquet")), out / f"part-{min(done)}-{'1' * 16}.parquet")
    (out / ".part-x.parquet.tmp-12345678").write_bytes(b"half a file")

    summary = run_preprocess(cfg)
    assert planned == [(16, 8), (11, 8)]  # 2 CPU stages x 4 logical CPUs: 8 read tasks for 16 files
    assert summary["this_run"]["input_files"] == 11
    assert (summary["input_files"], summary["rows_in"], summary["rows_written"]) == (16, 64, 64)
    assert not list(out.glob(".*tmp*"))
    assert_same_rows(read_cache(out), read_cache(synth_cache[0]))  # read_cache fails on duplicate ids
    ids_of = {
        unit_key(str(p)): set(pq.read_table(p).column("id").to_pylist()) for p in (tmp_path / "in").iterdir()
    }
    for shard in out.glob("part-*.parquet"):  # a shard never mixes input files, packed or not
        key = shard.name.removeprefix(cache.SHARD_PREFIX).rsplit("-", 1)[0]
        assert set(pq.read_table(shard).column(cache.ID).to_pylist()) <= ids_of[key], shard.name
    assert run_preprocess(cfg)["this_run"]["input_files"] == 0


def test_changed_or_duplicated_inputs_are_refused(synth_cache, synth_dir, tmp_path):
    """A finished input rewritten with the same size (only its mtime differs) and a new input repeating the
    ids of a finished one are refused before any work starts."""
    out = synth_cache[0]
    first = sorted(synth_dir.glob("*.parquet"))[0]
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(InputError, match=rf"{first.name} changed since it was processed into .*mtime_ns"):
            run_preprocess(config(synth_dir, out))
    finally:
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy(first, tmp_path / "again.parquet")
    with pytest.raises(InputError, match=rf"duplicate id '[^']+' in \S+{first.name} and \S+again.parquet"):
        run_preprocess(config(f"{synth_dir},{tmp_path / 'again.parquet'}", out))
