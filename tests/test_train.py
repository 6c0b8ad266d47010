"""Stage 2 on a real local Ray: train, checkpoint, kill a worker and resume, restart with 2 workers, export.

One baseline run (1 worker, 16 steps) is shared by several tests; the numbers it produces are pinned by
tests/golden/tiny_loss.txt (tests/golden_losses.py; the 2-worker golden is tests/test_tracking.py's run).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from cache_fixtures import write_test_cache
from golden_losses import ONE_WORKER, assert_golden
from PIL import Image

from sdray.errors import ConfigError
from sdray.models.config import ModelConfig
from sdray.train import checkpoint as ckpt
from sdray.train.config import LoraConfig, LossConfig, TrainConfig
from sdray.train.metrics import read_metrics
from sdray.train.run import run_training

pytestmark = pytest.mark.slow  # each Ray Train run starts worker processes: ~15-40 s apiece on 2 cores

STEPS = 16


@pytest.fixture(scope="module")
def train_cache(tiny_components, tmp_path_factory) -> Path:
    """64 rows (posterior mean and std) in 2 shards: 16 batches of 4 per epoch."""
    return write_test_cache(
        tmp_path_factory.mktemp("train") / "cache", tiny_components, num_rows=64, rows_per_shard=32
    )


def _cfg(cache: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        data=str(cache),
        output=str(out),
        batch_size=4,
        max_steps=STEPS,
        learning_rate=2e-3,
        warmup_steps=2,
        loss=LossConfig(snr_gamma=5.0, caption_dropout=0.1),
        checkpoint_every=4,
        keep_checkpoints=2,
        log_every=4,  # reports coincide with checkpoints: every step's row is still in the metrics file
        shuffle_buffer=16,
        max_failures=1,
        validate_every=8,
        validation_steps=2,
        ema_decay=0.99,
    )
    return TrainConfig(**{**base, **overrides})


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "ray" / "train").glob("checkpoint-step-*"))


@pytest.fixture(scope="module")
def baseline(ray_session, train_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "baseline"
    result = run_training(_cfg(train_cache, out), ModelConfig())
    return out, result


def test_run_writes_metrics_checkpoints_validation_and_matches_golden(baseline):
    out, result = baseline
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert result.step == STEPS and result.checkpoint.endswith("checkpoint-step-00000016")
    for row in rows:
        assert row["samples_per_s"] > 0 and 0 <= row["data_wait_frac"] <= 1 and row["grad_norm"] > 0
    assert rows[0]["lr"] < rows[2]["lr"] == pytest.approx(2e-3)  # warmup, then constant
    assert rows[-1]["epoch"] == 0  # 16 batches of the 64-row cache
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses  # it learns
    # keep_checkpoints=2 of the 4 written; each holds the shared state, rank 0's RNG and the configs
    assert [p.name for p in _checkpoints(out)] == ["checkpoint-step-00000012", "checkpoint-step-00000016"]
    assert {p.name for p in _checkpoints(out)[-1].iterdir()} >= {
        ckpt.STATE_FILE,
        ckpt.RUN_FILE,
        "rng-rank0.pt",
    }
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-00000008.png", "step-00000016.png"]
    assert Image.open(out / "validation" / grids[0]).size == (2 * 64, 2 * 64)  # 2 seeds x 2 prompts
    assert_golden(ONE_WORKER, rows, list(range(1, STEPS + 1)))
    assert yaml.safe_load((out / "train_config.yaml").read_text())["train"]["loader"] == "memory"  # auto


def test_a_run_starts_no_preemption_watcher(baseline, ray_session):
    """sdray turns Ray Train's preemption watcher off (sdray.cluster.TRAIN_ENV): one process fewer per run."""
    from ray._private.state import actors  # the GCS actor table, dead actors included; no dashboard needed

    classes = {info["ActorClassName"].rpartition(".")[2] for info in actors().values()}
    assert "TrainController" in classes and "RayTrainWorker" in classes, classes
    assert "PreemptionWatcher" not in classes


def test_export_loads_in_diffusers_with_ema_weights(baseline):
    from diffusers import StableDiffusionPipeline

    out, result = baseline
    pipe = StableDiffusionPipeline.from_pretrained(result.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    state = ckpt.read_shared_state(_checkpoints(out)[-1])
    exported = list(pipe.unet.parameters())
    shadow = state["ema"]["shadow_params"]
    assert len(exported) == len(shadow) and all(
        torch.equal(a, b) for a, b in zip(exported, shadow, strict=True)
    )
    raw = dict(pipe.unet.named_parameters())
    assert any(not torch.equal(raw[k], v) for k, v in state["unet"].items() if k in raw)  # EMA, not raw


def test_on_demand_export_of_an_older_checkpoint(baseline, tmp_path):
    from pipelines.export import main

    out, _ = baseline
    older = _checkpoints(out)[0]
    assert main(["--checkpoint", str(older), "--out", str(tmp_path / "m"), "--raw"]) == 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")
    saved = ckpt.read_shared_state(older)["unet"]
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def test_truncated_checkpoint_is_named_in_the_error(baseline, train_cache, tmp_path, capsys):
    import shutil

    from sdray.errors import InputError
    from sdray.train.state import build_state

    out, _ = baseline
    broken = tmp_path / "checkpoint-step-00000016"
    shutil.copytree(_checkpoints(out)[-1], broken)
    saved = (broken / ckpt.STATE_FILE).read_bytes()
    (broken / ckpt.STATE_FILE).write_bytes(saved[: len(saved) // 2])  # a half-written copy

    state = build_state(_cfg(train_cache, tmp_path / "run"), ModelConfig(), torch.device("cpu"), 0)
    origin = "s3://bucket/run/ray/train/checkpoint-step-00000016"  # what a worker resuming from S3 names
    with pytest.raises(InputError, match=f"^{origin}/training_state.pt: unreadable checkpoint file"):
        ckpt.load_into(broken, state, 0, origin=origin)

    from pipelines.export import main

    assert main(["--checkpoint", str(broken), "--out", str(tmp_path / "m")]) == 2
    assert f"{broken}/training_state.pt: unreadable checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_on_the_local_disk_is_renamed_into_the_run_not_copied(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def write_and_note_inode(out: Path) -> None:
        (out / "weights.bin").write_bytes(bytes(1000))
        (out / "inode.txt").write_text(str((out / "weights.bin").stat().st_ino))

    def report_one_checkpoint() -> None:  # defined here: the worker cannot import this test module
        from sdray import storage

        storage.report_checkpoint({"step": 1}, write_and_note_inode, "checkpoint-step-00000001")

    stale = tmp_path / "train" / ".sdray-checkpoint-rank0"  # as a worker killed while writing leaves it
    stale.mkdir(parents=True)
    (stale / "training_state.pt").write_bytes(b"half")
    run = RunConfig(name="train", storage_path=str(tmp_path))
    result = TorchTrainer(
        report_one_checkpoint, scaling_config=ScalingConfig(num_workers=1), run_config=run
    ).fit()

    saved = Path(result.checkpoint.path)
    assert saved == tmp_path / "train" / "checkpoint-step-00000001"
    assert (saved / "weights.bin").read_bytes() == bytes(1000)
    assert (saved / "weights.bin").stat().st_ino == int((saved / "inode.txt").read_text())  # the same file
    assert {p.name for p in saved.iterdir()} == {"weights.bin", "inode.txt"}  # nothing of the stale write
    assert not list((tmp_path / "train").glob(".sdray-checkpoint-*"))  # the staging folder is gone


def _mapped_file(tensor: torch.Tensor) -> str:
    """What /proc/self/maps names the mapping holding ``tensor``'s data: a file's path, "[heap]", "" (anonymous)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *fields = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return fields[4] if len(fields) > 4 else ""
    return ""


def test_full_training_copies_the_unet_out_of_its_model_file_and_lora_leaves_it_mapped(tiny_model_dir):
    """A weight left in safetensors' copy-on-write map costs a page fault per 4 KB at the first optimizer step."""
    from sdray.models.components import load_components
    from sdray.train.state import build_state

    model, cpu = ModelConfig(path=str(tiny_model_dir)), torch.device("cpu")
    loaded = load_components(model, ["unet"]).unet
    assert all(_mapped_file(p).endswith(".safetensors") for p in loaded.parameters())  # how diffusers loads
    full = build_state(TrainConfig(ema=False), model, cpu, 0)
    assert not [f for f in map(_mapped_file, full.params) if f.endswith(".safetensors")]
    for mine, theirs in zip(full.unet.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    lora = build_state(TrainConfig(ema=False, lora=LoraConfig(enabled=True, rank=4)), model, cpu, 0)
    frozen = [p for p in lora.unet.parameters() if not p.requires_grad]
    assert frozen and all(_mapped_file(p).endswith(".safetensors") for p in frozen)


def test_adamw_is_fused_by_default_and_updates_like_the_loop():
    from sdray.train.state import build_state

    cpu = torch.device("cpu")
    states = {
        f: build_state(TrainConfig(fused_adamw=f, ema=False), ModelConfig(), cpu, 0) for f in (True, False)
    }
    assert states[True].optimizer.defaults["fused"] is True and not states[False].optimizer.defaults["fused"]
    start = [p.detach().clone() for p in states[True].params]
    for state in states.values():
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in state.params:
                p.grad = torch.randn(p.shape, generator=g)
            state.optimizer.step()
    fused, loop = states[True].params, states[False].params
    assert all(not torch.equal(a, b) for a, b in zip(start, fused, strict=True))
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _checkpoint_registered(out: Path) -> bool:
    """Ray Train has recorded a checkpoint in its run snapshot (a resume will find it)."""
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint-step-" in snapshot.read_text()
    except OSError:
        return False


def _train_worker_pids() -> list[int]:
    """RayTrainWorker processes of this test session's Ray (descendants of this process only)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.fixture(scope="module")
def killed_run(ray_session, train_cache, tmp_path_factory):
    """The baseline config, with the worker process SIGKILLed once Ray has registered a checkpoint."""
    out = tmp_path_factory.mktemp("train") / "killed"
    cfg = _cfg(train_cache, out, checkpoint_every=2, validate_every=-1, export=False)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, ModelConfig())))
    thread.start()
    deadline, killed = time.monotonic() + 240, []
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        if _checkpoint_registered(out):
            for pid in _train_worker_pids():
                psutil.Process(pid).kill()
                killed.append(pid)
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed and not thread.is_alive() and "result" in outcome
    final = _checkpoints(out)[-1]
    return cfg, read_metrics(str(out)), ckpt.read_shared_state(final)


def test_killed_worker_resumes_with_identical_state(baseline, killed_run):
    base_out, _ = baseline
    _, rows, state = killed_run
    assert state["resumes"] == 1 and state["step"] == STEPS
    assert "history" not in state  # metrics rows live in metrics.jsonl, not in every checkpoint
    # No step repeated or skipped, and the same data, noise and optimizer path as the uninterrupted run.
    base_rows = read_metrics(str(base_out))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in base_rows]
    base = ckpt.read_shared_state(_checkpoints(base_out)[-1])
    for a, b in zip(state["ema"]["shadow_params"], base["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert state["ema"]["optimization_step"] == base["ema"]["optimization_step"] == STEPS
    assert all(torch.equal(state["unet"][k], v) for k, v in base["unet"].items())
    for key, value in base["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg"], value["exp_avg"])
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg_sq"], value["exp_avg_sq"])
    assert state["lr_scheduler"] == base["lr_scheduler"]


def test_restart_resumes_with_two_workers(killed_run):
    cfg, _, _ = killed_run
    # the run was trained with the memory loader; it resumes streaming (Ray Data, materialized in the object
    # store) with the same data accounting
    cfg = dataclasses.replace(
        cfg, max_steps=STEPS + 4, num_workers=2, grad_accum_steps=2, loader="stream", materialize=True
    )
    inode = (Path(cfg.output) / "metrics.jsonl").stat().st_ino
    result = run_training(cfg, ModelConfig())
    rows = read_metrics(cfg.output)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 5))  # the counter continues at 17
    assert (Path(cfg.output) / "metrics.jsonl").stat().st_ino == inode  # appended to, never rewritten
    assert result.step == STEPS + 4
    final = _checkpoints(Path(cfg.output))[-1]
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in final.iterdir()}  # both ranks saved
    new = rows[STEPS:]
    # 2 workers x 2 micro-batches x 4: the global batch is 16, and each step takes ~4 micro-batch times
    assert all(math.isfinite(r["loss"]) and r["loss"] < 2.0 for r in new)
    assert ckpt.read_shared_state(final)["resumes"] == 2
    assert new[0]["epoch"] == 1  # each worker's half-shard of 32 rows gives 4 steps of 2x4 per epoch
    assert yaml.safe_load((Path(cfg.output) / "train_config.yaml").read_text())["train"]["loader"] == "stream"


def test_auto_loader_reads_small_caches_into_memory_and_streams_large_ones():
    from sdray.train.run import choose_loader

    def loader(cfg: TrainConfig, megabytes: float, bucketed: bool = False) -> str:
        return choose_loader(cfg, bucketed=bucketed, num_bytes=int(megabytes * 2**20))

    cfg = TrainConfig(data="c", memory_loader_max_mb=100)
    assert loader(cfg, 60 + 40) == "memory"  # instance + class cache, 100 MB
    assert loader(cfg, 60 + 40.5) == "stream"
    assert loader(dataclasses.replace(cfg, loader="memory"), 5000) == "memory"
    assert loader(dataclasses.replace(cfg, loader="stream"), 1) == "stream"
    assert loader(cfg, 5000, bucketed=True) == "memory"  # buckets: always in memory
    with pytest.raises(ConfigError, match="train.loader stream cannot read a bucketed cache"):
        loader(dataclasses.replace(cfg, loader="stream"), 1, bucketed=True)


def test_rerun_with_fewer_steps_trains_nothing_and_keeps_the_saved_config(baseline, train_cache, capsys):
    from pipelines.train import main

    out, _ = baseline
    saved = (out / "train_config.yaml").read_bytes()
    result = run_training(_cfg(train_cache, out, max_steps=8, learning_rate=1e-5), ModelConfig())
    assert result.already_done and result.step == STEPS and result.checkpoint.endswith("step-00000016")
    assert main(["--data", str(train_cache), "--out", str(out), "--steps", "8"]) == 0
    assert f"is already at step {STEPS} (asked for 8): nothing trained" in capsys.readouterr().out
    assert (out / "train_config.yaml").read_bytes() == saved  # still describes the run


def test_a_finished_run_whose_export_is_older_than_its_last_checkpoint_is_exported_again(
    baseline, train_cache, caplog
):
    """Rank 0 exports when it finishes; a run stopped between its last checkpoint and that export (here: an
    export recorded at an earlier step) is not taken as done: the rerun resumes at the end and exports."""
    out, result = baseline
    info = out / "model" / "sdray_train.yaml"
    recorded = yaml.safe_load(info.read_text())
    assert recorded["step"] == STEPS and recorded["weights"] == "ema"
    before = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    info.write_text(yaml.safe_dump({**recorded, "step": 12}))
    with caplog.at_level("INFO", logger="sdray.train.run"):
        rerun = run_training(_cfg(train_cache, out), ModelConfig())
    assert "from its checkpoint" not in caplog.text  # rank 0 exported from memory, not the command's fallback
    assert not rerun.already_done and rerun.step == STEPS and rerun.model == result.model
    assert yaml.safe_load(info.read_text())["step"] == STEPS
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert [r["step"] for r in read_metrics(str(out))] == list(range(1, STEPS + 1))  # nothing trained again


def test_the_command_exports_from_the_last_checkpoint_what_rank_0_did_not(baseline, train_cache, tmp_path):
    """A worker lost between the last checkpoint and its export: the command exports from the checkpoint."""
    from ray.train import Checkpoint

    from sdray.train.run import ensure_exported

    out, result = baseline
    cfg = _cfg(train_cache, tmp_path / "run")  # another output: the baseline's own export stays
    latest = Checkpoint(str(_checkpoints(out)[-1]))
    assert ensure_exported(cfg, latest) == str(tmp_path / "run" / "model")
    info = yaml.safe_load((tmp_path / "run" / "model" / "sdray_train.yaml").read_text())
    assert (info["step"], info["weights"]) == (STEPS, "ema")
    unet = tmp_path / "run" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.read_bytes() == (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    written = unet.stat().st_mtime_ns
    ensure_exported(cfg, latest)  # already holds that step: not written again
    assert unet.stat().st_mtime_ns == written


def test_a_foreign_folder_where_the_model_goes_is_refused_before_training(train_cache, tmp_path):
    from sdray.errors import InputError

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"model is not empty \(notes.txt\) and is not an sdray export"):
        run_training(_cfg(train_cache, tmp_path / "run"), ModelConfig())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]  # nothing started


def test_export_refuses_a_folder_it_did_not_write_and_lists_existing_checkpoints(baseline, tmp_path, capsys):
    from pipelines.export import main

    out, _ = baseline
    latest = str(_checkpoints(out)[-1])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["--checkpoint", latest, "--out", str(foreign)]) == 2
    assert "is not empty (notes.txt) and is not an sdray export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"  # untouched
    assert main(["--checkpoint", latest, "--out", str(out)]) == 2  # a training run is not an export either
    assert (out / "metrics.jsonl").exists()
    assert main(["--checkpoint", latest, "--out", str(foreign), "--overwrite"]) == 0
    assert not (foreign / "notes.txt").exists() and (foreign / "unet").is_dir()
    assert main(["--checkpoint", latest, "--out", str(foreign)]) == 0  # an earlier export is replaced
    gone = str(out / "ray" / "train" / "checkpoint-step-00000004")
    assert main(["--checkpoint", gone, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-step-00000012, checkpoint-step-00000016" in err, err
