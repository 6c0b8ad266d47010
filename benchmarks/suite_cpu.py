"""Where the test suite's CPU goes: runs pytest and samples every process's CPU time once a second, by kind.

    .venv/bin/python benchmarks/suite_cpu.py                  # the whole suite, serially
    .venv/bin/python benchmarks/suite_cpu.py -- tests/test_train.py

A suite that keeps both cores busy for C CPU-seconds cannot finish in under C / 2 seconds, whatever the order
or the number of xdist workers; this says how large C is and what it is made of. Processes are grouped by what
they are: Ray workers by the actor or task they run (`ray::Name` process titles; "worker start-up" before a
worker's title is set, "worker idle" for `ray::IDLE`, which includes importing an actor's class), `sdray`
command processes by subcommand, Ray's own daemons, pytest, and the rest by executable name. CPU a process
used before the run started is not counted; a process that lives less than a second between two samples is
missed (its parent's wait is not CPU). "how many" counts the processes that used CPU as that kind (a Ray worker
counts under start-up, idle and its actor). The whole machine's busy and idle time come from /proc/stat.

Writes benchmarks/results/suite_cpu.{json,md} with the machine, load average, versions and command line;
publish only from an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DAEMONS = (
    "raylet",
    "gcs_server",
    "log_monitor",
    "dashboard",
    "runtime_env_agent",
    "monitor.py",
    "moto",
    "mlflow",
)
SDRAY_COMMAND = re.compile(r"pipelines(?:\.cli\s+|\.)([a-z_-]+)")


def kind(proc: psutil.Process) -> str:
    """What a process is, for grouping its CPU time."""
    name = proc.name()
    command = " ".join(proc.cmdline())
    title = re.search(r"ray::(\S+)", f"{name} {command}")
    if title:
        actor = title.group(1).split(".")[0]  # "RayTrainWorker.run_train_fn" -> "RayTrainWorker"
        return "ray: worker idle" if actor == "IDLE" else f"ray: {actor}"
    if "default_worker.py" in command:
        return "ray: worker start-up"
    if "cli_forkserver.py" in command:  # the docs chains' commands, forked from a preloaded server
        return "sdray client" if " run " in command else "sdray (forked) commands and server"
    match = SDRAY_COMMAND.search(command)
    if match:
        return f"sdray {match.group(1).replace('_', '-')}"
    for daemon in DAEMONS:
        if daemon in command:
            return f"daemon: {daemon}"
    if "chrom" in name:
        return "chromium"
    if re.search(r"-m pytest\b|/pytest\b", command):
        return "pytest"
    return f"other: {name}"


def _machine_times() -> dict[str, float]:
    times = psutil.cpu_times()
    return {"busy": sum(times) - times.idle - times.iowait, "idle": times.idle + times.iowait}


class Sampler:
    """CPU-seconds per kind of process since the first sample."""

    def __init__(self) -> None:
        self.last: dict[tuple[int, float], float] = {}
        self.cpu: collections.Counter[str] = collections.Counter()
        self.processes: dict[str, set[tuple[int, float]]] = collections.defaultdict(set)
        self.sample(baseline=True)

    def sample(self, baseline: bool = False) -> None:
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                used = times.user + times.system
                group = kind(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if key not in self.last:
                self.last[key] = used if baseline else 0.0
            if used > self.last[key]:  # to the kind it is now: an idle worker becomes an actor
                self.cpu[group] += used - self.last[key]
                self.processes[group].add(key)
            self.last[key] = used


def markdown(result: dict) -> str:
    machine = result["machine_cpu_s"]
    lines = [
        "# Where the test suite's CPU goes",
        "",
        f"{result['machine']}; load average {result['load_avg_start']} at start, {result['load_avg_end']} at end.",
        f"`{result['pytest']}`: exit {result['exit_code']}, {result['summary']}",
        "",
        f"Wall {result['wall_s']} s; the machine's cores were busy {machine['busy']} s and idle {machine['idle']} s "
        f"({result['busy_pct']}% busy): at full use of {os.cpu_count()} cores this much work takes "
        f"{result['floor_s']} s.",
        "",
        "| processes | CPU s | share | how many |",
        "|---|---|---|---|",
    ]
    sampled = sum(result["cpu_s"].values())
    for group, seconds in result["cpu_s"].items():
        if seconds >= 1:
            share = f"{100 * seconds / sampled:.1f}%"
            lines.append(f"| {group} | {seconds} | {share} | {result['processes'].get(group, 0)} |")
    lines += ["", f"`{result['command']}`", "", f"Versions: {json.dumps(result['versions'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for suite_cpu.{json,md}")
    parser.add_argument("pytest_args", nargs="*", default=["tests"], help="after --: pytest's arguments")
    args = parser.parse_args()

    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    result = {
        "benchmark": "suite_cpu",
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "pytest": shlex.join(["python", *pytest[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, CPU only",
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {name: version(name) for name in ("ray", "torch", "diffusers", "transformers", "pytest")},
    }
    sampler, before, start = Sampler(), _machine_times(), time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(pytest, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            time.sleep(1)
            sampler.sample()
        wall = time.monotonic() - start
        log.seek(0)
        tail = log.read()[-20000:]
    after = _machine_times()
    machine = {k: round(after[k] - before[k], 1) for k in before}
    result.update(
        exit_code=proc.returncode,
        summary=(tail.strip().splitlines() or [""])[-1],
        load_avg_end=[round(x, 2) for x in os.getloadavg()],
        wall_s=round(wall, 1),
        machine_cpu_s=machine,
        busy_pct=round(100 * machine["busy"] / (machine["busy"] + machine["idle"]), 1),
        floor_s=round(machine["busy"] / os.cpu_count(), 1),
        cpu_s={k: round(v, 1) for k, v in sampler.cpu.most_common()},
        processes={k: len(v) for k, v in sampler.processes.items()},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "suite_cpu.md").write_text(markdown(result))
    print(tail[-3000:])
    print(markdown(result))


if __name__ == "__main__":
    main()
