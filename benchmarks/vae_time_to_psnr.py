"""The demo VAE stage to its PSNR target, per `vae_train.mixed_precision`, side by side in one run.

    .venv/bin/python benchmarks/vae_time_to_psnr.py                      # fp32 and bf16, 1 round, 27 dB
    .venv/bin/python benchmarks/vae_time_to_psnr.py --rounds 2 --precision no bf16 --target 26
    # writes benchmarks/results/vae_time_to_psnr.{json,md}

Runs the real stage (`train_vae`: Ray Data decode, Ray Train) with the committed `demo` config's vae_train
section on the demo's 12,000-image synth set, each run in a fresh run directory (an existing one would be
resumed), the precisions alternating within each round. A run stops at the first evaluation at or above the
target (or at the config's max_steps). Reported per run: held-out PSNR, optimizer steps, seconds of optimizer
steps (as the stage measures them), seconds per step, and wall seconds of the whole stage (Ray start,
decoding, evaluations, checkpoints, export); the load average at the start and end of the benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

from sdray.data.synth import write_synth
from sdray.pipeline_config import load_pipeline_config
from sdray.precision import cpu_has_native_bf16
from sdray.vae.train import train_vae

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(precision: str, target: float, work: Path, data: Path) -> dict:
    """One `train_vae` run of the demo config at ``precision`` into a fresh directory under ``work``."""
    cfg = load_pipeline_config("demo")
    vae_cfg = dataclasses.replace(
        cfg.vae_train,
        data=str(data),
        output=str(work / f"run-{precision}-{time.time_ns()}"),
        target_psnr=target,
        mixed_precision=precision,
    )
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    try:
        result = train_vae(vae_cfg, cfg.model)
    finally:
        ray.shutdown()
    return {
        "precision": precision,
        "reached": result.psnr >= target,
        "psnr_db": round(result.psnr, 2),
        "steps": result.steps,
        "train_s": round(result.train_seconds, 1),
        "s_per_step": round(result.train_seconds / max(result.steps, 1), 4),
        "stage_wall_s": round(time.perf_counter() - started, 1),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in result.history],
    }


def markdown(record: dict) -> str:
    """The results as a short markdown page: settings, one row per run, the median per precision."""
    lines = [
        f"# Demo VAE stage to {record['target_psnr_db']} dB, by mixed precision ({record['started']})",
        "",
        f"{record['machine']}; load average {record['load_average_start']} at the start, "
        f"{record['load_average_end']} at the end. `{record['command']}`",
        "",
        f"Settings: the committed `demo` config's vae_train ({record['settings']}); each run in a fresh "
        "directory, precisions alternating.",
        "",
        "| round | precision | PSNR dB | steps | steps s | s / step | stage wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        lines.append(
            f"| {run['round']} | {run['precision']} | {run['psnr_db']} | {run['steps']} | {run['train_s']} "
            f"| {run['s_per_step']} | {run['stage_wall_s']} |"
        )
    lines += ["", "| precision | median s / step | median steps | median stage wall s |", "|---|---|---|---|"]
    for precision, m in record["median"].items():
        lines.append(f"| {precision} | {m['s_per_step']} | {m['steps']} | {m['stage_wall_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--rounds", type=int, default=1, help="runs per precision, alternating")
    parser.add_argument("--target", type=float, default=27.0, help="held-out PSNR to reach, dB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vae-bench"), help="data set and runs")
    args = parser.parse_args()

    cfg = load_pipeline_config("demo")
    data = args.work / "synth"
    if not data.exists():
        write_synth(cfg.synth, data)
    vt = cfg.vae_train
    record: dict = {
        "benchmark": "vae_time_to_psnr",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([".venv/bin/python", "benchmarks/vae_time_to_psnr.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, native bf16: {cpu_has_native_bf16()}",
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "target_psnr_db": args.target,
        "settings": f"{vt.num_workers} worker x {vt.threads_per_worker} threads, batch {vt.batch_size}, "
        f"lr {vt.learning_rate}, evaluated every {vt.report_every} steps, max_steps {vt.max_steps}",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "runs": [],
    }
    for round_ in range(1, args.rounds + 1):
        for precision in args.precision:
            run = {"round": round_, **one_run(precision, args.target, args.work, data)}
            record["runs"].append(run)
            print({k: v for k, v in run.items() if k != "history"}, flush=True)
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["median"] = {
        p: {
            key: round(statistics.median(r[key] for r in record["runs"] if r["precision"] == p), digits)
            for key, digits in (("s_per_step", 4), ("steps", None), ("stage_wall_s", 1))
        }
        for p in args.precision
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vae_time_to_psnr.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "vae_time_to_psnr.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
