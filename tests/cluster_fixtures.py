"""Clusters of their own for tests: scripts/local_cluster.py in a subprocess, and a `ray start --head` head.

scripts/local_cluster.py (a multi-node Ray cluster of its own) runs in a subprocess; its report is parsed.

A subprocess keeps the cluster apart from the test session's Ray (`ray_session`), gets the S3 variables in
its environment before its Ray starts, and makes removing a node a real process kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_cluster.py"


def run_local_cluster(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Run the script with ``args``; its last stdout line is the JSON report. Fails with its output tail."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SCRIPT.parent.parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"local_cluster.py exited {proc.returncode}:\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
        )
    return json.loads(lines[-1])


# --- A head started the documented way (`ray start --head`), for the job and Serve CLIs (tests/test_jobs.py) ---

READY_TIMEOUT_S = 300  # the head and its dashboard agent; ~10 s on an idle machine, minutes on a busy one


def run_shell(
    command: str, env: dict[str, str], *, cwd: Path = REPO, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run one documented command line with bash (its $VARIABLES come from ``env``); output captured."""
    return subprocess.run(
        ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


class HeadStartAborted(RuntimeError):
    """The head's raylet aborted while starting (see RayHead.raylet_aborted)."""


@dataclass
class RayHead:
    """`ray start --head --block` in a session (process group) of its own, with its own ports and temp dir.

    Stopping it signals that process group only, then kills whatever still runs from its temp dir (workers
    and job drivers that started sessions of their own): never a blanket `ray stop`, which would also stop
    every other Ray on the machine.
    """

    command: str
    env: dict[str, str]
    temp_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", f"exec {self.command}"],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def raylet_aborted(self) -> bool:
        """The raylet gave up at start-up: it waits ~15 s (not configurable) for the dashboard agent to write
        its listening port to a file, which a Python agent on a heavily loaded machine can miss."""
        for log in self.temp_dir.glob("session_*/logs/raylet.out"):
            if "Timed out waiting for file" in log.read_text(errors="replace"):
                return True
        return False

    def wait_ready(self, dashboard_port: int, agent_port: int) -> float:
        """Seconds until the dashboard and the dashboard agent answer (a job needs both).

        Raises HeadStartAborted when the raylet aborted at start-up (then retry with a fresh head).
        """
        start = time.monotonic()
        urls = [
            f"http://127.0.0.1:{dashboard_port}/api/gcs_healthz",
            f"http://127.0.0.1:{agent_port}/api/healthz",
        ]
        while not all(_http_ok(u) for u in urls):
            if self.raylet_aborted():
                raise HeadStartAborted(self.log.read_text()[-2000:])
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise AssertionError(
                    f"the head was not ready in {READY_TIMEOUT_S} s:\n{self.log.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        return time.monotonic() - start

    def start_ready(self, dashboard_port: int, agent_port: int, *, attempts: int = 3) -> float:
        """start() and wait_ready(), with a fresh head after a start-up abort; seconds it took in all."""
        start = time.monotonic()
        for attempt in range(attempts):
            self.start()
            try:
                self.wait_ready(dashboard_port, agent_port)
                return time.monotonic() - start
            except HeadStartAborted:
                self.stop()
                shutil.rmtree(self.temp_dir, ignore_errors=True)  # or the old raylet.out reads as a new abort
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self, grace_s: float = 5) -> None:
        """SIGTERM to the head's process group, SIGKILL after ``grace_s``, then leftovers of this temp dir."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.temp_dir) in arg for arg in p.info["cmdline"] or ()):
                with contextlib.suppress(psutil.Error):
                    p.kill()
