"""What every benchmark's results file starts with, and writing it: benchmarks/results/<stem>.{json,md}.

Benchmarks run as scripts (`.venv/bin/python benchmarks/<name>.py`), so this folder is on their import path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_header(script: str) -> dict:
    """Date, exact command, machine, package versions and the load average at the start of the run."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", f"benchmarks/{Path(script).name}", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {name: version(name) for name in ("torch", "ray", "diffusers", "pyarrow")},
        "load_average_at_start": os.getloadavg(),
    }


def publish(stem: str, result: dict, markdown: str) -> None:
    """Write the JSON and the markdown table under benchmarks/results/ and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
