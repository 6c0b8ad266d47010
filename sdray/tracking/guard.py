"""Guard: tracking is an observer; a backend that fails (a server gone, a full disk) must not stop training."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Guard:
    """Runs one backend's calls: on an exception, one warning per outage and a pause of ``retry_after_s``.

    While paused, calls are skipped (they return None); the first call after the pause tries again.
    """

    def __init__(self, name: str, *, retry_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.paused_until: float | None = None
        self.failures = 0

    @property
    def paused(self) -> bool:
        return self.paused_until is not None and self.clock() < self.paused_until

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None when paused or when it raised (then warn and pause)."""
        if self.paused:
            return None
        try:
            result = fn()
        except Exception as exc:  # any failure of an observer is survivable
            self.failures += 1
            self.paused_until = self.clock() + self.retry_after_s
            if self.failures == 1:  # one warning per outage, not one per step
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                log.warning(
                    "tracking: %s failed (%s) for %s: %s; training goes on, next try in %.0f s",
                    what, type(exc).__name__, self.name, reason, self.retry_after_s,
                )  # fmt: skip
            return None
        if self.failures:
            log.warning("tracking: %s answers again after %d failed call(s)", self.name, self.failures)
            self.failures = 0
        self.paused_until = None
        return result


def mlflow_client(uri: str, *, timeout_s: float):
    """An MlflowClient for ``uri`` whose HTTP calls give up after ``timeout_s`` and one retry.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would stall a training step for
    minutes when the server is gone. Values already in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)
