"""What a short `sdray train` costs on an already running Ray, by phase, and what sdray's Ray Train settings
(`sdray.cluster.TRAIN_ENV`: the controller's poll interval, no preemption watcher) change.

    .venv/bin/python benchmarks/train_fixed_cost.py --rounds 4

One local Ray (as `sdray` starts it, or the test session's), one small tiny-preset cache, then 2-step runs
of `sdray.train.run.run_training` (1 worker, no validation) in alternating rounds: Ray Train's defaults (2 s
poll, a preemption watcher actor per run), sdray's poll with Ray's watcher, and sdray's settings, so that
machine noise hits all alike. Ray Train hands these variables from the driver to its controller at fit(), so
all variants run on the same Ray. Phases per run: the driver's own work before fit(), fit() until the train
function starts on the worker (controller and worker processes, imports), the worker's function (model, first
data block, 2 steps, checkpoint, loss curve), and the rest (the controller noticing the end, export); cpu_s is
the CPU time of the whole machine during the run (every Ray process: the controller, its helper actors, the
worker). Writes benchmarks/results/train_fixed_cost.{json,md} with the machine, load average, versions and
command line; publish only from a quiet machine (load below ~2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
POLL, WATCHER = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
VARIANTS = {
    "ray_defaults": {POLL: "2.0", WATCHER: "1"},
    "poll_0.25s": {POLL: "0.25", WATCHER: "1"},
    "sdray": {},  # sdray.cluster.TRAIN_ENV
}
PHASES = ("driver_s", "to_train_fn_s", "train_fn_s", "after_s", "total_s", "cpu_s")


def _timed_worker(stamps: Path):
    """The real train function, wrapped to record when it starts and ends on the worker."""
    from sdray.train.loop import train_worker

    def worker(config: dict) -> None:
        start = time.time()
        train_worker(config)
        with open(stamps, "a") as f:
            f.write(json.dumps({"start": start, "end": time.time()}) + "\n")

    return worker


def one_run(cache: Path, work: Path, settings: dict[str, str]) -> dict[str, float]:
    import sdray.train.loop as train_loop
    import sdray.train.run as train_run
    from sdray.cluster import TRAIN_ENV
    from sdray.models.config import ModelConfig
    from sdray.train.config import TrainConfig

    os.environ.update({**TRAIN_ENV, **settings})
    stamps = Path(tempfile.mkstemp(dir=work, suffix=".jsonl")[1])
    fit_called: list[float] = []
    real_trainer = train_run._trainer

    def trainer(*args, **kwargs):
        fit_called.append(time.time())
        return real_trainer(*args, **kwargs)

    out = Path(tempfile.mkdtemp(dir=work))
    cfg = TrainConfig(data=str(cache), output=str(out), batch_size=4, max_steps=2, validate_every=-1)
    with (
        mock.patch.object(train_loop, "train_worker", _timed_worker(stamps)),  # run._trainer imports it
        mock.patch.object(train_run, "_trainer", trainer),
    ):
        cpu, start = _machine_cpu_s(), time.time()
        train_run.run_training(cfg, ModelConfig())
        end = time.time()
        cpu = _machine_cpu_s() - cpu
    (stamp,) = [json.loads(line) for line in stamps.read_text().splitlines()]
    return {
        "driver_s": fit_called[0] - start,
        "to_train_fn_s": stamp["start"] - fit_called[0],
        "train_fn_s": stamp["end"] - stamp["start"],
        "after_s": end - stamp["end"],
        "total_s": end - start,
        "cpu_s": cpu,
    }


def _machine_cpu_s() -> float:
    times = psutil.cpu_times()
    return times.user + times.system


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        phase: {
            "median": round(statistics.median(r[phase] for r in runs), 2),
            "min": round(min(r[phase] for r in runs), 2),
            "max": round(max(r[phase] for r in runs), 2),
        }
        for phase in PHASES
    }


def markdown(result: dict) -> str:
    lines = [
        "# A 2-step `sdray train` on a running Ray: where the time goes",
        "",
        f"{result['machine']}; load average {result['load_avg_start']} at start, {result['load_avg_end']} at "
        f"end; {result['rounds']} rounds, variants alternating, the first (warm-up) round left out.",
        "",
        "| Ray Train settings | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for name, summary in result["variants"].items():
        cells = [f"{s['median']} ({s['min']}-{s['max']})" for s in summary.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    settings = ", ".join(f"{name}: {env or 'sdray.cluster.TRAIN_ENV'}" for name, env in VARIANTS.items())
    lines += ["", f"Seconds, median (min-max); {settings}.", "", f"`{result['command']}`", ""]
    lines += [f"Versions: {json.dumps(result['versions'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="runs per variant after one warm-up round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for train_fixed_cost.{json,md}")
    args = parser.parse_args()

    import ray

    sys.path.insert(0, str(ROOT / "tests"))
    from cache_fixtures import write_test_cache

    from sdray.cluster import export_serve_fast_path
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig

    result = {
        "benchmark": "train_fixed_cost",
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, CPU only",
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {name: version(name) for name in ("ray", "torch", "diffusers", "transformers")},
        "rounds": args.rounds,
    }
    export_serve_fast_path()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = write_test_cache(
            work / "cache", load_components(ModelConfig()), num_rows=32, rows_per_shard=16
        )
        for round_ in range(args.rounds + 1):
            for name, settings in VARIANTS.items():
                timing = one_run(cache, work, settings)
                print(
                    f"round {round_} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()),
                    flush=True,
                )
                if round_:
                    runs[name].append(timing)
    ray.shutdown()
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["variants"] = {name: _summary(r) for name, r in runs.items()}
    result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_fixed_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train_fixed_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
