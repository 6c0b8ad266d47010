"""The browser test skips without Chromium on a developer machine, but fails under CI=true (a broken image)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _collect(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci, "SDRAY_CHROMIUM": "/nonexistent/chromium"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_web_page.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_missing_chromium_fails_under_ci_and_skips_otherwise():
    ci = _collect("true")
    assert ci.returncode != 0 and "CI=true but Debian chromium is missing" in ci.stdout + ci.stderr
    local = _collect("")
    assert local.returncode == 5, local.stdout[-2000:]  # 5: no tests collected (the module skipped)
