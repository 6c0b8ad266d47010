"""Multi-node on one machine with every location on S3 (moto), losing a worker node in each stage.

One run of scripts/local_cluster.py (its own Ray cluster: 0-CPU head, two worker nodes) reads the input from
the bucket, preprocesses across the nodes while the node of the encoder actor is removed (and replaced),
trains with 2 workers on 2 nodes while a node with a worker is removed (and replaced), checkpoints and
exports to the bucket; the sampler then loads the exported model from the bucket. Row accounting: every input
row is in the cache exactly once. Step accounting: training resumes from a checkpoint and ends at max_steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from cluster_fixtures import run_local_cluster
from s3_fixtures import s3_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):  # noqa: F811
    bucket = s3_server.bucket
    report = run_local_cluster(
        ["--workdir", str(tmp_path_factory.mktemp("s3run")), "--data", f"s3://{bucket}/input",
         "--out", f"s3://{bucket}/out", "--kill", "preprocess,train"],
        env=s3_server.env,
    )  # fmt: skip
    return s3_server, report


def test_preprocess_survives_a_lost_node_and_writes_every_row_once_to_s3(s3_run):
    s3, report = s3_run
    assert report["preprocess_node_killed"] is True  # the encoder actor's node was removed mid-run
    assert report["preprocess_committed_at_kill"] < 6  # with input files still in flight: lost, then redone
    assert report["preprocess_attempts"] <= 2  # Ray's retries, or one rerun resuming from the manifest
    assert (report["rows_in"], report["rows_written"], report["rows_rejected"]) == (48, 48, 0)
    assert report["shard_rows"] == report["distinct_ids"] == 48  # exactly once
    keys = s3.list("out/cache")
    assert "_summary.json" in keys and "_cache.json" in keys
    assert sum(k.startswith("_manifest/") for k in keys) == 6  # one record per input file


def test_two_node_training_resumes_after_a_lost_node_and_exports_to_s3(s3_run):
    s3, report = s3_run
    assert report["train_worker_nodes"] == 2  # one Ray Train worker per node
    assert report["train_node_killed"] is True
    assert report["train_resumes"] >= 1  # restarted from a checkpoint (FailureConfig), not from scratch
    # Steps past the last checkpoint were done when the node went: lost, trained again, logged once.
    assert report["train_step_at_kill"] > report["train_checkpoint_at_kill"] >= 4
    assert report["train_logged_steps"] == list(range(1, 17))
    assert report["train_step"] == report["expected_steps"] == 16
    assert report["train_model"] == f"s3://{s3.bucket}/out/train/model"
    keys = s3.list("out/train")
    ckpts = {k.split("/")[2] for k in keys if k.startswith("ray/train/checkpoint-step-")}
    assert ckpts == {"checkpoint-step-00000012", "checkpoint-step-00000016"}  # keep_checkpoints=2
    last = "ray/train/checkpoint-step-00000016"
    assert {f"{last}/rng-rank0.pt", f"{last}/rng-rank1.pt", f"{last}/training_state.pt"} <= set(keys)
    assert "model/unet/diffusion_pytorch_model.safetensors" in keys and "metrics.jsonl" in keys


def test_sampler_loads_the_exported_model_from_s3(s3_run, monkeypatch, tmp_path):
    s3, _ = s3_run
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3.env[key])
    monkeypatch.setenv("SDRAY_CACHE_DIR", str(tmp_path / "cache"))
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    components = load_components(ModelConfig(path=f"s3://{s3.bucket}/out/train/model"))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # downloaded once, then loaded locally
    sampler = Sampler(components)
    request = GenerationRequest(
        prompt="a red circle", seeds=(1,), width=64, height=64, steps=2, guidance_scale=5.0, scheduler="euler"
    )
    images = sampler.generate([request])
    assert images[0][0].shape == (64, 64, 3) and np.isfinite(images[0][0]).all()
