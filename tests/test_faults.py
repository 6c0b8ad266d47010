"""Ctrl-C / SIGTERM on the stage commands leaves no output that looks complete but is not.

(Losing a worker node in each stage is tested in tests/test_multinode.py.) Row accounting: after an
interrupted preprocessing run and a rerun, every input row is in the cache exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from cli_forkserver import client_command

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FILES = 40  # input files of the interrupted preprocessing run


def _sdray(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _terminate_when(proc: subprocess.Popen, ready, timeout: float = 300) -> tuple[int, str]:
    """SIGTERM ``proc`` once ``ready(output_lines)`` holds; returns (exit code, output)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready(lines):
        assert proc.poll() is None, "finished before it could be interrupted:\n" + "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "no progress to interrupt"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def interrupted_cache(ray_session, sdray_forkserver, tmp_path_factory):
    """A preprocessing run stopped by SIGTERM while it runs (on a Ray of its own, as `sdray` runs by default),
    then rerun on the session's Ray (which Ray the rerun joins does not matter to what it resumes), forked from
    the preloaded `sdray` (tests/cli_forkserver.py) as the docs chains run it."""
    from sdray.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("sigterm")
    # 40 files of 8 rows, encoded 2 at a time: once the encoder is up, files are committed over ~2 s, enough
    # for the signal to land after the first commit and before the last
    data = write_synth(SynthConfig(num_images=FILES * 8, resolution=64, rows_per_shard=8), root / "input")
    cache = root / "cache"
    args = ("preprocess", "--input", str(data), "--output", str(cache), "--set", "preprocess.decode_batch_size=4",
            "--set", "preprocess.encode_batch_size=2", "--set", "preprocess.rows_per_shard=8")  # fmt: skip
    proc = _sdray(*args, env={**os.environ, "SDRAY_LOG_DIR": str(root / "logs")})
    # Interrupt once the first input file is committed: shards are written block by block while encoding goes
    # on, so files are committed one after another and the signal lands with some done and some not.
    code, output = _terminate_when(proc, lambda _: any((cache / "_manifest").glob("*.json")))
    state = {
        "code": code,
        "output": output,
        "summary_after_kill": (cache / "_summary.json").exists(),
        "committed_after_kill": len(list((cache / "_manifest").glob("*.json"))),
    }
    from sdray.data.reader import committed_shards
    from sdray.errors import InputError

    try:
        committed_shards(str(cache), [str(p) for p in cache.glob("part-*.parquet")])
        state["reader"] = "accepted"
    except InputError as exc:
        state["reader"] = str(exc)
    session = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    rerun = subprocess.run(
        [*client_command(sdray_forkserver), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=session,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return cache, state


def test_sigterm_on_preprocess_publishes_no_summary_and_rerun_writes_each_row_once(interrupted_cache):
    cache, state = interrupted_cache
    assert state["code"] == 130, state["output"][-3000:]
    assert "interrupted" in state["output"]
    assert not state["summary_after_kill"]  # the run's completion record is written last
    assert 0 < state["committed_after_kill"] < FILES  # what was committed before the signal stays committed
    assert "preprocessing did not finish" in state["reader"]  # training refuses the interrupted cache
    summary = json.loads((cache / "_summary.json").read_text())
    rows = FILES * 8
    assert (summary["rows_in"], summary["rows_written"], summary["input_files"]) == (rows, rows, FILES)
    assert summary["this_run"]["input_files"] == FILES - state["committed_after_kill"]  # resumed, not redone
    ids = pq.read_table(cache, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == rows


def test_sigterm_on_train_leaves_checkpoints_but_no_model(interrupted_cache, ray_session, tmp_path):
    cache, _ = interrupted_cache
    run = tmp_path / "run"
    session = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = _sdray("train", "--data", str(cache), "--out", str(run), "--steps", "500",
                  "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2", env=session)  # fmt: skip
    code, output = _terminate_when(proc, lambda _: any((run / "ray" / "train").glob("checkpoint-step-*")))
    assert code == 130, output[-3000:]
    assert not (run / "model").exists()  # the exported model appears only at the end, atomically
    assert not list(run.glob(".model.tmp-*"))
    ckpts = sorted((run / "ray" / "train").glob("checkpoint-step-*"))
    assert ckpts and all((c / "training_state.pt").is_file() for c in ckpts)  # what is there is whole


SIGTERM_DURING_RAY_START = """
import os, signal, sys, threading, time
import psutil
from pipelines.common import run
from sdray.cluster import ensure_ray

def terminate_once_ray_spawns():
    while not psutil.Process().children():
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGTERM)

def body():
    threading.Thread(target=terminate_once_ray_spawns, daemon=True).start()
    ensure_ray()
    time.sleep(60)  # not reached: Ray's start-up takes seconds

sys.exit(run(body))
"""


def test_sigterm_while_ray_starts_exits_130_and_leaves_no_process():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DURING_RAY_START], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    child_pids: set[int] = set()
    while proc.poll() is None:  # the node processes Ray started, to check that none outlive the command
        child_pids |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert child_pids and not [pid for pid in child_pids if psutil.pid_exists(pid)]
