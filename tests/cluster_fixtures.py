"""Run scripts/local_cluster.py (a multi-node Ray cluster of its own) in a subprocess and parse its report.

A subprocess keeps the cluster apart from the test session's Ray (`ray_session`), gets the S3 variables in
its environment before its Ray starts, and makes removing a node a real process kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_cluster.py"


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
