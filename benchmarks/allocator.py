"""The sd15 UNet's training step (or the sd15 encoders' batch) under the system malloc and under jemalloc
(`train.allocator`, `preprocess.encode_allocator`), side by side.

    .venv/bin/python benchmarks/allocator.py                     # 2 rounds of 6 steps, 256 px, batch 2
    .venv/bin/python benchmarks/allocator.py --rounds 1 --steps 4 --resolution 128
    # writes benchmarks/results/allocator.{json,md}
    .venv/bin/python benchmarks/allocator.py --workload encode --steps 4 --out preprocess_allocator_sd15_256

`--workload encode` times what a preprocessing encoder actor runs instead: `Encoder.encode` (the sd15 VAE
encoder and text encoder, inference, fp32) on batches of 16 images at `--resolution` px, in a thread as Ray
Data runs it; a "step" is one batch. `--workload sample` times what a batch-generation sampler actor runs:
`Sampler.generate` of 2 images (one batch, guidance on, 4 Euler steps, VAE decode) at `--resolution` px.
`--workload serve` times what a model replica (2 CPUs) runs behind `sdray serve` (`serve.allocator`): one request
for 1 image at `--resolution` px (guidance on, 4 steps, PNG) to a private local Ray and Serve with the sd15
model directory `--model` (built, untimed, when missing); there the allocator is the replica's (the child
process only sends requests), and the page faults and system CPU are read from the replica's process.

The allocator is chosen when a process starts (LD_PRELOAD), so each measurement is a fresh child process of
this script, the two allocators alternating within each round: the sd15 architecture's UNet (860M
parameters, random weights) at `--resolution` px, batch 2, 2 threads, sdray's loss and its default fused
AdamW with clipping, fp32, as a `sdray train` worker runs it (in a thread, as Ray Train's workers do).
`jemalloc` gets the environment `sdray.allocator.worker_env("jemalloc")` gives Ray Train's workers; `system`
runs with LD_PRELOAD and MALLOC_CONF unset.

Per process: the first step (it allocates the gradients and AdamW's state), the median of the later steps,
and the minor page faults and system CPU time per later step, where the two differ: the system malloc hands
the largest blocks back to the kernel after each step and faults them in again at the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATORS = ("system", "jemalloc")


def encode_step(resolution: int):
    """One sd15 encoder batch as a preprocessing encoder actor runs it (16 random images and captions)."""
    import numpy as np

    from sdray.config import to_dict
    from sdray.models.components import load_components
    from sdray.pipeline_config import load_pipeline_config
    from sdray.preprocess.encode import Encoder
    from sdray.preprocess.run import cache_info

    cfg = load_pipeline_config("sd15", [f"preprocess.resolution={resolution}"])
    info = cache_info(load_components(cfg.model, parts=("tokenizer", "text_encoder", "vae")), cfg)
    encoder = Encoder(model=to_dict(cfg.model), info_json=info.to_json(), num_threads=2)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 3, resolution, resolution), dtype=np.uint8)
    ids = rng.integers(0, 49408, (16, 77), dtype=np.int64)
    return lambda: encoder.encode(pixels, ids)


def sample_step(resolution: int):
    """One batch of 2 images, 4 denoising steps, as a batch-generation sampler actor runs it."""
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    sampler = Sampler(
        load_components(ModelConfig(preset="sd15")), source="sd15", device="cpu", dtype="float32"
    )
    request = GenerationRequest(
        prompt="a red cube on a table",
        seeds=(0, 1),
        width=resolution,
        height=resolution,
        steps=4,
        guidance_scale=7.5,
        scheduler="euler",
    )
    return lambda: sampler.generate([request], max_batch=2)


def serve_requests(resolution: int, steps: int, choice: str, model: Path) -> dict:
    """``steps`` requests, one at a time, to an sdray app whose model replica runs ``choice``; the replica's
    faults and system CPU per request (read from /proc: the replica is another process)."""
    import httpx
    import psutil
    import ray
    from ray import serve

    from sdray.models.config import ModelConfig
    from sdray.serve.app import start
    from sdray.serve.config import ServeConfig

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig(port=port, allocator=choice, num_cpus=2, max_batch_size=1, request_timeout_s=600)
    url = start(cfg, ModelConfig(path=str(model)))
    replica = next(
        p for p in psutil.process_iter(["cmdline"]) if "SDModel" in " ".join(p.info["cmdline"] or [])
    )
    loaded = serve.get_deployment_handle("SDModel", app_name="sdray").stats.remote().result()["allocator"]
    body = {"prompt": "a red cube on a table", "size": f"{resolution}x{resolution}", "steps": 4, "seed": 0}

    def usage() -> tuple[int, float]:
        fields = Path(f"/proc/{replica.pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[7]), replica.cpu_times().system  # minflt: field 10 of stat, 8th after the name

    rows = []
    with httpx.Client(timeout=600) as client:
        for _ in range(steps):
            (faults, sys_s), start_s = usage(), time.perf_counter()
            client.post(url + "v1/images/generations", json=body).raise_for_status()
            seconds, (faults_after, sys_after) = time.perf_counter() - start_s, usage()
            rows.append(
                {
                    "s": round(seconds, 3),
                    "minor_faults": faults_after - faults,
                    "sys_s": round(sys_after - sys_s, 2),
                }
            )
    serve.shutdown()
    ray.shutdown()
    return {"loaded": loaded, "steps": rows}


def child(resolution: int, steps: int, workload: str, choice: str, model: Path) -> dict:
    """Run ``steps`` training steps (or encoder batches, sampler batches, HTTP requests) in a thread; per
    step: seconds, minor faults, system CPU seconds."""
    import torch

    if workload == "serve":
        return serve_requests(resolution, steps, choice, model)
    if workload in ("encode", "sample"):
        return timed_steps((encode_step if workload == "encode" else sample_step)(resolution), steps)
    from cpu_step_speed import _batch_maker, _unet_step

    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.train.config import TrainConfig

    torch.set_num_threads(2)
    parts = load_components(ModelConfig(preset="sd15"), ["unet", "vae", "text_encoder", "scheduler"])
    loss_cfg = TrainConfig().loss.resolve(parts.scheduler.config)
    make_batch = _batch_maker(parts, loss_cfg, 2, latent_side=resolution // parts.vae_downsample)
    unet = parts.unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    step = _unet_step(unet, params, optimizer, None, "baseline", make_batch, parts.scheduler, loss_cfg)
    return timed_steps(step, steps)


def timed_steps(step, steps: int) -> dict:
    from sdray.allocator import loaded_allocator

    rows: list[dict] = []

    def run() -> None:
        for _ in range(steps):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append(
                {
                    "s": round(time.perf_counter() - start, 3),
                    "minor_faults": after.ru_minflt - before.ru_minflt,
                    "sys_s": round(after.ru_stime - before.ru_stime, 2),
                }
            )

    worker = threading.Thread(target=run)  # Ray Train runs the training function in a thread too
    worker.start()
    worker.join()
    return {"loaded": loaded_allocator(), "steps": rows}


def measure(allocator: str, args) -> dict:
    """One child process under ``allocator``; its steps summarized."""
    from sdray.allocator import worker_env

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if args.workload != "serve":  # serve: the replica gets it through serve.allocator, not the client
        env |= worker_env(allocator) if allocator == "jemalloc" else {}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--resolution",
        str(args.resolution),
        "--steps",
        str(args.steps),
        "--workload",
        args.workload,
        "--allocator",
        allocator,
        "--model",
        str(args.model),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{allocator} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    later = record["steps"][1:]
    return {
        "allocator": allocator,
        "loaded": record["loaded"],
        "process_wall_s": round(time.perf_counter() - start, 1),
        "first_step_s": record["steps"][0]["s"],
        "later_step_s_median": round(statistics.median(r["s"] for r in later), 2),
        "later_faults_median": int(statistics.median(r["minor_faults"] for r in later)),
        "later_sys_s_median": round(statistics.median(r["sys_s"] for r in later), 2),
        "steps": record["steps"],
    }


def save_sd15(model: Path) -> None:
    """The sd15 architecture with random weights as a model directory (in a child: this process stays light)."""
    save = "import sys; from sdray.models.components import load_components as l, save_components as s; "
    save += "from sdray.models.config import ModelConfig; s(l(ModelConfig(preset='sd15')), sys.argv[1])"
    subprocess.run([sys.executable, "-c", save, str(model)], check=True, capture_output=True)


def markdown(record: dict) -> str:
    what, setup, unit = {
        "train": ("the sd15 UNet's step", "batch 2, fused AdamW", "one optimizer step"),
        "encode": (
            "the sd15 encoders' batch",
            "VAE encoder and text encoder, inference, batch 16",
            "one batch",
        ),
        "sample": ("the sd15 sampler's batch", "2 images, guidance, 4 Euler steps, VAE decode", "one batch"),
        "serve": (
            "an sd15 request to sdray serve",
            "1 image, guidance, 4 steps, PNG; a private local Ray and Serve, one model replica",
            "one HTTP request, the replica's faults and system CPU",
        ),
    }[record.get("workload", "train")]
    lines = [
        f"# {what[0].upper() + what[1:]} by memory allocator ({record['date']})",
        "",
        f"{record['machine']}; load average {record['load_average_start']} at the start, "
        f"{record['load_average_end']} at the end. `{record['command']}`",
        "",
        f"sd15 architecture (random weights), {record['resolution']} px, {setup}, 2 threads, fp32; "
        f"{record['steps']} steps (a step: {unit}) a process, "
        f"{record['rounds']} rounds, the allocators alternating.",
        "",
        "| round | allocator | first step, s | later steps, s (median) | page faults a later step | "
        "system CPU s a later step | process, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(record["runs"]):
        lines.append(
            f"| {i // len(ALLOCATORS) + 1} | {run['loaded']} | {run['first_step_s']} | "
            f"{run['later_step_s_median']} | {run['later_faults_median']:,} | {run['later_sys_s_median']} | "
            f"{run['process_wall_s']} |"
        )
    summary = record["summary"]
    lines += [
        "",
        f"Later steps, median over rounds: system {summary['system_step_s']} s, jemalloc "
        f"{summary['jemalloc_step_s']} s ({summary['speedup']}x); first steps: system "
        f"{summary['system_first_s']} s, jemalloc {summary['jemalloc_first_s']} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps a process (the first is reported apart)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workload", choices=["train", "encode", "sample", "serve"], default="train")
    parser.add_argument(
        "--model", type=Path, default=Path("/tmp/sdray-allocator/sd15"), help="serve: sd15 model directory"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=ALLOCATORS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="allocator", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is reported apart)")
    if args.child:
        print(json.dumps(child(args.resolution, args.steps, args.workload, args.allocator, args.model)))
        return
    if args.workload == "serve" and not (args.model / "model_index.json").is_file():
        save_sd15(args.model)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/allocator.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {name: version(name) for name in ("torch", "diffusers", "ray")},
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "resolution": args.resolution,
        "workload": args.workload,
        "steps": args.steps,
        "rounds": args.rounds,
        "runs": [],
    }
    for _ in range(args.rounds):
        for allocator in ALLOCATORS:
            record["runs"].append(measure(allocator, args))
            print(json.dumps({k: v for k, v in record["runs"][-1].items() if k != "steps"}), flush=True)
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]

    def median(allocator: str, key: str) -> float:
        return round(statistics.median(r[key] for r in record["runs"] if r["allocator"] == allocator), 2)

    step = {a: median(a, "later_step_s_median") for a in ALLOCATORS}
    record["summary"] = {
        "system_step_s": step["system"],
        "jemalloc_step_s": step["jemalloc"],
        "speedup": round(step["system"] / step["jemalloc"], 2),
        "system_first_s": median("system", "first_step_s"),
        "jemalloc_first_s": median("jemalloc", "first_step_s"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
