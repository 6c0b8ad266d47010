"""Quiet runs: a command's own output on the terminal, Ray's internals in a log file.

Ray writes to the driver's stderr from Python (its loggers resolve ``sys.stderr`` when they emit), from its
C++ core (file descriptor 2: `core_worker.cc` lines, GCS time-outs) and from workers (log lines forwarded to
the driver's stdout and stderr). `quiet_console` points file descriptor 2 -- and with it ``sys.stderr`` -- at
a log file and hands the command a stream to the real terminal for its errors and sdray's log lines;
``print`` to stdout is untouched, and `sdray.cluster.ensure_ray` stops forwarding worker logs (they stay in
Ray's session folder, /tmp/ray/session_latest/logs on the head node).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LOG_DIR_ENV = "SDRAY_LOG_DIR"
_quiet_log: Path | None = None  # set while a quiet_console block runs


def quiet_log() -> Path | None:
    """The log file of the running quiet command, or None (verbose, or not a command)."""
    return _quiet_log


@dataclass
class Console:
    """Where a command writes: ``err`` is the terminal's stderr; ``log_stream`` the log file (quiet runs)."""

    err: TextIO
    log_path: Path | None = None
    log_stream: TextIO | None = None
    final: str | None = None
    """The closing message (an ``error: ...`` line), printed last, after the log's path."""

    def fail(self, message: str) -> None:
        self.final = message

    def close(self) -> None:
        """Say where the log is (when anything was logged), then the closing message, if any."""
        if self.log_path is not None:
            if self.log_path.stat().st_size:
                note = "details" if self.final else "Ray's log"
                print(f"{note}: {self.log_path} (-v shows it on the terminal)", file=self.err, flush=True)
            else:
                self.log_path.unlink()
        if self.final:
            print(self.final, file=self.err, flush=True)


def log_path() -> Path:
    """A new log file name under $SDRAY_LOG_DIR (default: <temp dir>/sdray-logs)."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "sdray-logs")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet_console(*, enabled: bool) -> Iterator[Console]:
    """Send stderr (Python's and the C++ core's) to a log file for the block, unless disabled.

    Also a no-op when a caller already captures ``sys.stderr`` (pytest's in-process tests).
    """
    if not enabled or sys.stderr is not sys.__stderr__ or not _has_fd(sys.stderr):
        console = Console(err=sys.stderr)
        try:
            yield console
        finally:
            console.close()
        return
    path = log_path()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log = open(path, "a", buffering=1)  # noqa: SIM115 - closed below, after fd 2 is restored
    os.dup2(log.fileno(), 2)
    console = Console(err=terminal, log_path=path, log_stream=log)
    global _quiet_log  # noqa: PLW0603 - one command per process; read by sdray.cluster.ensure_ray
    _quiet_log = path
    try:
        yield console
    finally:
        _quiet_log = None
        _stop_ray()  # its shutdown chatter belongs in the log too
        sys.stderr.flush()
        log.close()
        os.dup2(terminal.fileno(), 2)
        console.close()
        terminal.close()


def _has_fd(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
