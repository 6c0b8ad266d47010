"""Rank-0 worker side of tracking: per-step metrics and validation images to MLflow and TensorBoard.

Metrics are buffered and sent every ``flush_every`` steps in one MLflow request (a request per step would
cost a round trip per step). A resumed run redoes the steps after its last checkpoint; MLflow cannot delete
values, so steps it already holds are not sent again (no duplicate steps), and TensorBoard's ``purge_step``
hides the old events of the redone steps.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from typing import Any

from sdray import storage
from sdray.progress import Progress, show_in_worker
from sdray.tracking.guard import Guard
from sdray.tracking.run import CONFIG_KEY, TrackingRun

log = logging.getLogger(__name__)

STEP_KEY = "loss"
"""The metric every stage logs at every logged step; its last step tells where a resumed run left off."""
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_PENDING_STEPS = 10_000  # kept while the server is away; beyond that the oldest are dropped


class StepLogger:
    """Logs one stage's steps; with tracking off (and on ranks other than 0) every call does nothing."""

    def __init__(self, run: TrackingRun, *, start_step: int, flush_every: int, prefix: str = "train"):
        self.run, self.prefix, self.flush_every = run, prefix, max(1, flush_every)
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.client, self.logged_until = None, 0
        self.mlflow_guard = run.guard()
        if run.run_id:
            self.client = run.client()
            self.logged_until = self.mlflow_guard.call("reading the run", self._last_logged_step) or 0
        self.images_from = self.logged_until
        self.writer = None
        self.board_guard = Guard(f"TensorBoard in {run.tensorboard_dir}", retry_after_s=run.retry_after_s)
        if run.tensorboard_dir:
            from tensorboardX import SummaryWriter

            purge = start_step + 1 if start_step else None  # events of steps after the checkpoint are stale
            self.writer = self.board_guard.call(
                "opening the event file", lambda: SummaryWriter(run.tensorboard_dir, purge_step=purge)
            )

    @classmethod
    def for_rank(
        cls, run: Mapping[str, Any] | None, *, rank: int, start_step: int, flush_every: int, prefix: str
    ) -> StepLogger:
        """The logger of worker ``rank``: only rank 0 logs (the loss is already averaged over ranks)."""
        tracking = TrackingRun.from_dict(run) if rank == 0 else TrackingRun()
        return cls(tracking, start_step=start_step, flush_every=flush_every, prefix=prefix)

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run.run_id, STEP_KEY)
        return max((m.step for m in history), default=0)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Record the numeric ``values`` of ``step`` (a metrics row; its own "step" key is skipped)."""
        numbers = {
            k: float(v)
            for k, v in values.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self.writer is not None:
            self.board_guard.call("writing scalars", lambda: self._scalars(step, numbers))
        if self.client is not None:
            self.pending.append((step, numbers))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def _scalars(self, step: int, numbers: Mapping[str, float]) -> bool:
        for key, value in numbers.items():
            self.writer.add_scalar(f"{self.prefix}/{key}", value, step)
        return True

    def flush(self) -> None:
        """Send the buffered steps MLflow lacks; on failure keep them for the next try."""
        if self.writer is not None:
            self.board_guard.call("flushing the event file", lambda: self.writer.flush() or True)
        fresh = [(s, v) for s, v in self.pending if s > self.logged_until]
        if self.client is None or not fresh:
            self.pending.clear()
            return
        if self.mlflow_guard.call("logging metrics", lambda: self._send(fresh)):
            self.logged_until = max(s for s, _ in fresh)
            self.pending.clear()
        else:
            self.pending = fresh[-MAX_PENDING_STEPS:]

    def _send(self, rows: list[tuple[int, dict[str, float]]]) -> bool:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run.run_id, metrics=metrics[i : i + MAX_METRICS_PER_CALL])
        return True

    def log_image(self, uri: str, *, step: int, key: str = "validation") -> None:
        """Log the PNG at ``uri`` (a validation grid) as an image of ``step``."""
        if (self.client is None and self.writer is None) or step <= self.images_from:
            return
        import numpy as np
        from PIL import Image

        image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
        if self.client is not None:
            self.mlflow_guard.call(
                "logging an image",
                lambda: self.client.log_image(self.run.run_id, image, key=key, step=step) or True,
            )
        if self.writer is not None:
            pixels = np.asarray(image)  # (H, W, 3) uint8
            self.board_guard.call(
                "writing an image",
                lambda: (
                    self.writer.add_image(f"{self.prefix}/{key}", pixels, step, dataformats="HWC") or True
                ),
            )

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.board_guard.call("closing the event file", lambda: self.writer.close() or True)


class WorkerTracking:
    """A training worker's observers, on rank 0 only: the tracking backends and a progress line.

    The loop's whole surface: ``step`` after every step, ``log`` for a metrics row, ``image`` for a validation
    grid, ``close`` at the end.
    """

    def __init__(
        self,
        loop_config: Mapping[str, Any],
        *,
        rank: int,
        start_step: int,
        max_steps: int,
        flush_every: int,
        name: str,
    ) -> None:
        self.logger = StepLogger.for_rank(
            loop_config.get(CONFIG_KEY),
            rank=rank,
            start_step=start_step,
            flush_every=flush_every,
            prefix=name,
        )
        self.progress = Progress(max_steps, label=name, unit="step", done=start_step) if rank == 0 else None
        if self.progress is not None:
            show_in_worker()

    def step(self, step: int, *, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(step, loss=loss)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        self.logger.log(step, row)

    def image(self, uri: str, *, step: int) -> None:
        self.logger.log_image(uri, step=step)

    def close(self) -> None:
        self.logger.close()
