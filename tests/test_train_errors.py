"""Stage 2 refuses bad input with a clear message: mismatched or empty caches, missing paths, a NaN loss."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cache_fixtures import write_test_cache

from sdray.data import cache
from sdray.errors import ConfigError, InputError
from sdray.models.config import ModelConfig
from sdray.train.config import TrainConfig
from sdray.train.metrics import read_metrics
from sdray.train.run import TrainingDiverged, expected_cache, run_training


def _cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), output=str(out), batch_size=4, validate_every=-1, export=False, **kw)


def test_cache_from_other_encoders_is_refused_naming_both(ray_session, tiny_components, tmp_path):
    data = write_test_cache(tmp_path / "c", tiny_components, num_rows=4, encoder_fingerprint="0" * 64)
    ours = expected_cache(TrainConfig(), ModelConfig()).encoder_fingerprint
    with pytest.raises(InputError) as err:
        run_training(_cfg(data, tmp_path / "run"), ModelConfig())
    assert "0" * 16 in str(err.value) and ours[:16] in str(err.value) and str(data) in str(err.value)
    # another model seed = other encoder weights = another fingerprint
    assert expected_cache(TrainConfig(), ModelConfig(seed=1)).encoder_fingerprint != ours


def test_cache_at_other_resolution_is_refused_naming_both(ray_session, tiny_components, tmp_path):
    data = write_test_cache(tmp_path / "c", tiny_components, num_rows=4, resolution=128)
    with pytest.raises(InputError, match=r"cache resolution is 128px but training expects 64px"):
        run_training(_cfg(data, tmp_path / "run"), ModelConfig())


def test_empty_missing_and_too_small_caches(ray_session, tiny_components, tmp_path):
    empty = write_test_cache(tmp_path / "empty", tiny_components, num_rows=0)
    with pytest.raises(InputError, match="0 rows"):
        run_training(_cfg(empty, tmp_path / "run"), ModelConfig())
    with pytest.raises(InputError, match="does not exist"):
        run_training(_cfg(tmp_path / "nowhere", tmp_path / "run"), ModelConfig())
    (tmp_path / "not-a-cache").mkdir()
    with pytest.raises(InputError, match="not a latent cache"):
        run_training(_cfg(tmp_path / "not-a-cache", tmp_path / "run"), ModelConfig())
    small = write_test_cache(tmp_path / "small", tiny_components, num_rows=6)
    with pytest.raises(InputError, match=r"6 rows, but one step needs batch_size x num_workers = 8"):
        run_training(_cfg(small, tmp_path / "run", num_workers=2), ModelConfig())
    with pytest.raises(ConfigError, match="train.data"):
        run_training(TrainConfig(), ModelConfig())


def test_cli_reports_a_bad_cache_as_one_line(tmp_path, capsys):
    from pipelines.train import main

    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: latent cache") and "does not exist" in err[0]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    ray_session, tiny_components, tmp_path
):
    data = write_test_cache(tmp_path / "c", tiny_components, num_rows=16, rows_per_shard=16)
    shard = data / "part-00000.parquet"
    table = pq.read_table(shard)
    info = cache.read_shard_info(shard)
    latents = table.column(cache.LATENT).combine_chunks().flatten().to_numpy().reshape(16, *info.latent_shape)
    latents = latents.copy()
    latents[9] = np.inf  # a corrupt row in the third batch of 4 (rows are read in file order)
    columns = cache.unflatten(
        {n: table.column(n).combine_chunks().flatten().to_numpy() for n in cache.tensor_columns(info)}, info
    )
    pq.write_table(
        cache.to_table(
            info,
            ids=table.column(cache.ID).to_pylist(),
            latents=latents,
            latent_std=columns[cache.LATENT_STD],
            text_embeds=columns[cache.TEXT_EMBEDS],
            captions=table.column(cache.CAPTION).to_pylist(),
        ),
        shard,
    )
    out = tmp_path / "run"
    cfg = _cfg(data, out, loader="stream", shuffle_buffer=0, checkpoint_every=2, max_steps=8, max_failures=0)
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 3; .*checkpoint-step-00000002.*step 2"
    ):
        run_training(cfg, ModelConfig())
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert sorted(p.name for p in (out / "ray" / "train").glob("checkpoint-step-*")) == [
        "checkpoint-step-00000002"
    ]
    assert json.loads((out / "diverged.json").read_text())["step"] == 3


def _moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("moto_server did not start")


def test_cache_and_run_files_on_object_storage(ray_session, tiny_components, tmp_path, monkeypatch):
    """The reader and the run's files go through pyarrow file systems: the same code reads s3:// URIs."""
    import pyarrow.fs as pafs

    from sdray import storage
    from sdray.data.reader import open_cache
    from sdray.train.metrics import append_metrics, truncate_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _moto(port)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        s3 = pafs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="k",
            secret_key="s",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("bkt")
        local = write_test_cache(tmp_path / "c", tiny_components, num_rows=4)
        pafs.copy_files(str(local), "bkt/cache", destination_filesystem=s3)
        expected = expected_cache(TrainConfig(), ModelConfig())
        opened = open_cache("s3://bkt/cache", expected)
        assert opened.num_rows == 4 and opened.info == cache.read_cache_info(local)
        np.testing.assert_array_equal(opened.empty_caption, cache.read_empty_caption(local))
        with pytest.raises(InputError, match="cache resolution is 64px but training expects 128px"):
            open_cache("s3://bkt/cache", dataclasses.replace(expected, resolution=128))
        with pytest.raises(InputError, match="does not exist"):
            open_cache("s3://bkt/nowhere", expected)
        rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
        append_metrics("s3://bkt/run", rows[:1])
        append_metrics("s3://bkt/run", rows[1:])  # object stores have no append: the object is rewritten
        assert read_metrics("s3://bkt/run") == rows and storage.exists("s3://bkt/run/metrics.jsonl")
        truncate_metrics("s3://bkt/run", 1)
        assert read_metrics("s3://bkt/run") == rows[:1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("run_file", "reason"),
    [
        ("train: [unclosed\n", "not valid YAML"),
        ("run: x\n", "not an sdray run file (missing: train, model, cache_info)"),
        ("train: {data: d, output: o, no_such_key: 1}\nmodel: {}\ncache_info: {}\n", "no_such_key"),
        (
            "train: {data: d, output: o}\nmodel: {}\ncache_info: {resolution: 64}\n",
            "cache_info has no 'latent_shape'",
        ),
        (
            "train: {data: d, output: o}\nmodel: {}\ncache_info: {latent_shape: 4, text_embeds_shape: [77, 32]}\n",
            "bad cache_info",
        ),
    ],
)
def test_export_names_a_malformed_run_file(tmp_path, capsys, run_file, reason):
    from pipelines.export import main

    checkpoint = tmp_path / "checkpoint-step-00000004"
    checkpoint.mkdir()
    (checkpoint / "run.yaml").write_text(run_file)
    (checkpoint / "training_state.pt").write_bytes(b"\x00" * 64)
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}/run.yaml: " in err and reason in err, err
    assert "Traceback" not in err and not (tmp_path / "model").exists()
