"""Experiment tracking and progress lines.

Unit tests of the pieces (progress lines, the failure guard, config), then a real MLflow server
(tests/tracking_fixtures.py) tracking a 2-worker training (its losses are the 2-worker golden): params, metrics
at every step, validation image, model artifact, tags, TensorBoard events; a rerun continues the same MLflow
run without repeating a step, and killing the server mid-run leaves training to finish with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
from cache_fixtures import write_test_cache
from golden_losses import TWO_WORKERS, assert_golden
from tracking_fixtures import start_mlflow_server, tensorboard_steps

from sdray.errors import ConfigError
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.progress import Progress
from sdray.tracking.config import TrackingConfig
from sdray.tracking.guard import Guard
from sdray.tracking.run import RUN_FILE, flatten, resolve, start_run
from sdray.tracking.steps import StepLogger
from sdray.train import checkpoint as ckpt
from sdray.train.config import TrainConfig
from sdray.train.metrics import read_metrics
from sdray.train.run import run_training


def test_progress_lines_show_count_rate_and_eta(caplog):
    clock = [0.0]
    progress = Progress(100, label="train", unit="step", done=20, interval_s=10, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="sdray.progress"):
        clock[0] = 5.0
        progress.update(25, loss=0.5)  # within the interval: no line
        clock[0] = 10.0
        progress.update(30, loss=0.25)
        clock[0] = 12.0
        progress.update(100)  # the end always gets a line
    lines = [r.getMessage() for r in caplog.records if r.name == "sdray.progress"]
    assert len(lines) == 2, lines
    # 10 steps in 10 s since the resume at step 20: 1 step/s, 70 steps left -> ETA 01:10
    assert "30/100" in lines[0] and "00:10<01:10" in lines[0] and "1.00step/s" in lines[0], lines[0]
    assert "loss=0.25" in lines[0] and lines[1].startswith("train: 100%")


def test_quiet_train_follows_the_metrics_file_on_the_driver(tmp_path, caplog):
    """Worker progress lines stay in Ray's logs in a quiet run; the driver reads rank 0's metrics rows."""
    import json
    import time

    from sdray.train.metrics import METRICS_FILE, progress_from_metrics

    metrics = tmp_path / METRICS_FILE
    following = progress_from_metrics(str(tmp_path), max_steps=8, interval_s=0.05)
    with caplog.at_level(logging.INFO, logger="sdray.progress"), following:
        time.sleep(0.2)  # no file yet: no line, no error
        metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (5, 6)))
        time.sleep(0.3)
        with metrics.open("a") as f:
            f.write(json.dumps({"step": 8, "loss": 0.125}) + "\n")
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "sdray.progress"]
    assert len(lines) == 2, lines  # one per new last row, none while the file was missing or unchanged
    assert "6/8" in lines[0] and "loss=0.1667" in lines[0], lines[0]
    assert lines[1].startswith("train: 100%") and "8/8" in lines[1] and "loss=0.125" in lines[1], lines[1]


def test_last_metrics_row_reads_only_the_tail_and_skips_a_half_written_line(tmp_path):
    import json

    from sdray.train.metrics import METRICS_FILE, last_metrics_row

    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 2001))
    (tmp_path / METRICS_FILE).write_text(rows + '{"step": 2001, "lo')  # an append in progress
    assert last_metrics_row(str(tmp_path), tail_bytes=200) == {"step": 2000, "loss": 1.0 / 2000}
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 0.5}\n')
    assert last_metrics_row(str(tmp_path)) == {"step": 1, "loss": 0.5}


def test_guard_warns_once_per_outage_pauses_then_retries(caplog):
    clock, calls = [0.0], []

    def refused() -> None:
        calls.append(clock[0])
        raise ConnectionError("connection refused")

    guard = Guard("MLflow at http://x", retry_after_s=60, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="sdray.tracking"):
        assert guard.call("logging metrics", refused) is None
        clock[0] = 30.0
        assert guard.call("logging metrics", refused) is None  # paused: not even tried
        clock[0] = 61.0
        assert guard.call("logging metrics", refused) is None  # tried again, still down: no new warning
        clock[0] = 122.0
        assert guard.call("logging metrics", lambda: "sent") == "sent"
    assert calls == [0.0, 61.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "connection refused" in messages[0] and "training goes on" in messages[0]
    assert "answers again after 2 failed call(s)" in messages[1]


def test_tracking_config_section_defaults_and_errors(tmp_path):
    cfg = load_pipeline_config("tiny", ["tracking.mlflow=true", "tracking.tensorboard=true"]).tracking
    run = resolve(cfg, str(tmp_path))
    assert run.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"  # a store inside the run directory
    assert run.tensorboard_dir == str(tmp_path / "tensorboard")
    assert resolve(TrackingConfig(), str(tmp_path)).mlflow_uri == ""  # off by default
    with pytest.raises(ConfigError, match="needs tracking.mlflow_uri"):
        resolve(cfg, "s3://bucket/run")
    with pytest.raises(ConfigError, match="tracking.mlfow"):
        load_pipeline_config("tiny", ["tracking.mlfow=true"])
    assert flatten(
        {"train": {"lr": 1e-4, "prompts": ["a", "b"]}, "model": {"unet": {}, "preset": "tiny"}}
    ) == {
        "train.lr": "0.0001",
        "train.prompts": '["a", "b"]',
        "model.unet": "{}",
        "model.preset": "tiny",
    }


# --- a real MLflow server and a 2-worker training -------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield started
    started.kill()


@pytest.fixture(scope="module")
def cache(tiny_components, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracking") / "cache"
    return write_test_cache(out, tiny_components, num_rows=32, rows_per_shard=16)


def _cfg(cache: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(data=str(cache), output=str(out), num_workers=2, batch_size=4, max_steps=4, log_every=2)
    base |= dict(checkpoint_every=2, validate_every=0, validation_steps=2, shuffle_buffer=0, ema_decay=0.99)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def first_run(ray_session, server, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "run"
    tracking = TrackingConfig(mlflow=True, mlflow_uri=server.uri, experiment="tests", tensorboard=True)
    result = run_training(_cfg(cache, out), ModelConfig(), tracking)
    return out, tracking, result


@pytest.mark.slow
def test_training_is_tracked_in_mlflow_and_tensorboard(first_run, server):
    from mlflow import MlflowClient

    out, _, result = first_run
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["train.max_steps"] == "4"
    assert params["model.preset"] == "tiny" and params["cache_info.resolution"] == "64"
    fingerprint = ckpt.read_spec(result.checkpoint).info.encoder_fingerprint
    assert run.data.tags["sdray.cache_fingerprint"] == fingerprint
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", run.data.tags["sdray.git_revision"])
    rows = read_metrics(str(out))
    for key in ("loss", "lr", "grad_norm", "data_wait_s", "samples_per_s"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3, 4], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in rows]), key
    model = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model_index.json", "model/unet"} <= model
    assert client.list_artifacts(run_id, "images"), "the validation grid"
    board = tensorboard_steps(out / "tensorboard")
    assert board["train/loss"] == [1, 2, 3, 4] and board["train/validation"] == [4]


@pytest.mark.slow
def test_two_worker_run_matches_golden(first_run):
    """DDP over 2 workers, each on its half of the cache (ordered ingest), is as deterministic as 1 worker."""
    out, _, _ = first_run
    rows = [r for r in read_metrics(str(out)) if r["step"] <= 4]  # the rerun below appends steps 5-12
    assert_golden(TWO_WORKERS, rows, [1, 2, 3, 4])


@pytest.mark.slow
def test_a_resumed_worker_does_not_log_a_step_twice(first_run, server, tmp_path):
    from mlflow import MlflowClient

    _, tracking, _ = first_run
    run = start_run(
        tracking, output=str(tmp_path), stage="train", params={"train": {"max_steps": 7}}, tags={}
    )
    first = StepLogger(run, start_step=0, flush_every=2)
    for step in range(1, 6):
        first.log(step, {"step": step, "loss": float(step)})
    first.close()  # steps 1-5 sent, as if the worker then died with its last checkpoint at step 2
    again = StepLogger(run, start_step=2, flush_every=2)
    for step in range(3, 8):
        again.log(step, {"step": step, "loss": 10.0 + step})
    again.close()
    history = sorted(MlflowClient(server.uri).get_metric_history(run.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 16), (7, 17)]


@pytest.mark.slow
def test_rerun_continues_the_mlflow_run_and_survives_the_server_dying(first_run, server, cache, caplog):
    from mlflow import MlflowClient

    out, tracking, _ = first_run
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    live = MlflowClient(server.uri)
    outcome: dict = {}
    cfg = _cfg(cache, out, max_steps=12)
    thread = threading.Thread(
        target=lambda: outcome.update(result=run_training(cfg, ModelConfig(), tracking))
    )
    with caplog.at_level(logging.WARNING, logger="sdray.tracking"):
        thread.start()
        deadline = time.monotonic() + 600
        while thread.is_alive() and time.monotonic() < deadline:
            if max((m.step for m in live.get_metric_history(run_id, "loss")), default=0) >= 6:
                server.kill()  # mid-run: steps 7-12, the validation image and the model upload remain
                break
            time.sleep(0.2)
        thread.join(timeout=600)
    assert server.proc.poll() is not None, "the run ended before the server was killed"
    assert outcome["result"].step == 12 and outcome["result"].model  # trained to the end and exported
    assert any("training goes on" in r.getMessage() for r in caplog.records)
    stored = MlflowClient(server.store_uri)  # the dead server's database
    steps = sorted(m.step for m in stored.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, len(steps) + 1)) and 6 <= len(steps) < 12  # one run, no step twice
    experiment = stored.get_experiment_by_name("tests").experiment_id
    same_dir = stored.search_runs([experiment], filter_string="attributes.run_name = 'run'")
    assert [r.info.run_id for r in same_dir] == [run_id]  # the rerun opened no second run
    assert stored.get_run(run_id).data.params["train.max_steps"] == "4"  # params keep their first value
