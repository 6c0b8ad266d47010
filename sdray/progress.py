"""Progress a person can read, for every long command: one line per interval, in logs and terminals alike.

    progress = Progress(total=640, label="preprocess", unit="images")
    for batch in batches:
        ...
        progress.update(done, rejected=rejects)   # at most one line every interval_s, and one at the end
    # preprocess:  19%|#9        | 120/640 [00:29<02:07, 4.10images/s, rejected=3]

Lines (not a redrawn bar) because the commands also run as `ray job submit` jobs and inside Ray workers,
whose output is a log file; the line is tqdm's own format (count, percentage, elapsed<ETA, rate). Lines go to
the `sdray.progress` logger at INFO, which the entry points show.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

log = logging.getLogger("sdray.progress")


class Progress:
    """Counts units done out of ``total`` and emits a progress line every ``interval_s`` seconds."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        unit: str = "it",
        done: int = 0,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.label, self.unit, self.interval_s, self.clock = total, label, unit, interval_s, clock
        self.initial = self.done = done  # units done before this process started (a resumed run)
        self.fields: dict[str, Any] = {}
        self.started = self.last_emit = clock()
        self.lines = 0

    def update(self, done: int, **fields: Any) -> None:
        """Set the units done (absolute) and the extra fields shown (e.g. loss=0.12); maybe emit a line."""
        self.done, self.fields = done, {**self.fields, **fields}
        now = self.clock()
        if now - self.last_emit >= self.interval_s or self.done >= self.total:
            self.emit(now)

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Add ``n`` units done."""
        self.update(self.done + n, **fields)

    def line(self, now: float | None = None) -> str:
        """``label:  19%|#9        | 120/640 [00:29<02:07, 4.10images/s, rejected=3]``."""
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed if self.done > self.initial else None
        postfix = ", ".join(f"{k}={_short(v)}" for k, v in self.fields.items()) or None
        return tqdm.format_meter(
            self.done,
            self.total,
            elapsed,
            prefix=self.label,
            unit=self.unit,
            rate=rate,
            postfix=postfix,
            initial=self.initial,
            ascii=True,  # log files and `ray job logs` render ASCII everywhere
        )

    def emit(self, now: float | None = None) -> None:
        self.last_emit = self.clock() if now is None else now
        self.lines += 1
        log.info("%s", self.line(self.last_emit))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_in_worker() -> None:
    """In a Ray worker process: let progress lines through at INFO, to stderr when nothing else handles them
    (Ray keeps a worker's stderr in its log file and forwards it to the driver's console)."""
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
