"""Runs the commands of README.md and docs/*.md as a user would (rules: tests/docs_commands.py).

Every `sdray` command is a process of its own, forked from the session's preloaded `sdray`
(tests/cli_forkserver.py: the ~10 s of imports per command are paid once); they all attach to the session's
Ray through RAY_ADDRESS instead of each starting a private one. The chains are separate test modules
(test_docs_*.py), so that `make test` can run them side by side.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cli_forkserver import client_command
from docs_commands import CHAINS, PREREQUISITES, ROOT, all_commands, chain_commands, why_not_run
from serve_fixtures import free_port

SERVE_START_TIMEOUT_S = 300


def _shim(bin_dir: Path, forkserver: Path) -> None:
    """`sdray` and `python` on PATH: this checkout's console script (forked from the preloaded server at
    ``forkserver``) and interpreter."""
    bin_dir.mkdir()
    (bin_dir / "sdray").write_text(f'#!/bin/sh\nexec {shlex.join(client_command(forkserver))} "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for name in ("sdray", "python"):
        (bin_dir / name).chmod(0o755)


def _with_port(command: str, port: int) -> str:
    if "--port" in command:
        return re.sub(r"--port \d+", f"--port {port}", command)
    return f"{command} --port {port}"


def _serve_once(command: str, env: dict[str, str], cwd: Path, where: str) -> None:
    """Start `sdray serve`, ask for one image, stop it with SIGTERM: exit 130 and a clean 'stopped' line."""
    port = free_port()
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + _with_port(command, port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"{where}: {command} ended: {proc.stderr.read()}"
            if line.startswith("serving http://"):
                break
            assert time.monotonic() < deadline, f"{where}: {command} not ready"
        assert "no API key" in line or "API key required" in line, line
        body = {"prompt": "a red circle", "size": "64x64", "steps": 2, "seed": 1}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in err and "resume" not in err, err


def _first_serve() -> str:
    """Where the first runnable `sdray serve` of the docs is: the one started for real."""
    return next(
        c.where
        for c in all_commands()
        if c.mode == "run" and not why_not_run(c.command) and re.search(r"(^|\s)sdray serve\b", c.command)
    )


def run_chain(chain: str, ray_address: str, tiny_model_dir: Path, tmp_path: Path, forkserver: Path) -> None:
    """Run the commands of one of CHAINS as written, in order, in a fresh directory under ``tmp_path``;
    every `sdray` command attaches to the Ray at ``ray_address`` and is forked from the server at
    ``forkserver`` (the `sdray_forkserver` fixture)."""
    address = ray_address
    _shim(tmp_path / "bin", forkserver)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "RAY_ADDRESS": address,
        "SDRAY_LOG_DIR": str(tmp_path / "logs"),
    }
    env.pop(os.environ.get("SDRAY_API_KEY_ENV", "SDRAY_API_KEY"), None)
    work = tmp_path / "clone"
    work.mkdir()
    for path in PREREQUISITES.get(chain, {}):  # model directories another chain trains
        shutil.copytree(tiny_model_dir, work / path)
    first_serve, served = _first_serve(), False
    for doc in chain_commands(chain):
        reason = why_not_run(doc.command)
        if reason:
            print(f"not run: {doc.where}: {doc.command} ({reason})")
            continue
        command = doc.runnable
        if doc.mode == "run" and re.search(r"(^|\s)sdray serve\b", command):
            if doc.where == first_serve:
                _serve_once(command, env, work, doc.where)
                served = True
                continue
            command = _with_port(command, free_port()) + " --check"
        start = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        print(
            f"{time.monotonic() - start:6.1f} s  {doc.where}: {command[:100]}"
        )  # shown with -s or on failure
        assert result.returncode == 0, f"{doc.where}: {command}\n{result.stdout}\n{result.stderr}"
    assert served or first_serve.partition(":")[0] not in CHAINS[chain], (
        "the first `sdray serve` did not start"
    )
