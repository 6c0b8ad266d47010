"""Training metrics: one row per step, appended as JSON lines beside the run, plus a loss-curve PNG.

Rows are appended (never rewritten) at every log step, so I/O grows with the rows written, not with the
run's length; checkpoints do not carry them. A resumed run first cuts the file back to its checkpoint's step
(rows written after that checkpoint were lost with the workers and are trained again), so no step is listed
twice. On object stores, which have no append, each append rewrites the object.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from sdray import storage

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def step_row(
    *, step: int, epoch: int, loss: float, lr: float, grad_norm: float, timing: dict[str, float]
) -> dict:
    """One metrics row. ``timing``: step_time_s, data_wait_s (seconds) and samples (global examples)."""
    step_time = max(timing["step_time_s"], 1e-9)
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": timing["samples"] / step_time,
        "step_time_s": step_time,
        "data_wait_s": timing["data_wait_s"],
        "data_wait_frac": timing["data_wait_s"] / step_time,
    }


def _lines(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def append_metrics(run_uri: str, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` to ``<run>/metrics.jsonl``."""
    if rows:
        storage.append_bytes(storage.join(run_uri, METRICS_FILE), _lines(rows))


def truncate_metrics(run_uri: str, step: int) -> None:
    """Keep only the rows up to ``step`` (once, when a run resumes from the checkpoint at ``step``)."""
    uri = storage.join(run_uri, METRICS_FILE)
    if storage.exists(uri):
        rows = read_metrics(run_uri)
        kept = [row for row in rows if row["step"] <= step]
        if len(kept) < len(rows):
            storage.write_bytes(uri, _lines(kept))


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    raw = storage.read_bytes(storage.join(run_uri, METRICS_FILE)).decode()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def last_metrics_row(run_uri: str, tail_bytes: int = 64 * 1024) -> dict[str, Any] | None:
    """The newest complete row of the metrics file, from its tail only (the file grows with the run)."""
    lines = storage.read_tail(storage.join(run_uri, METRICS_FILE), tail_bytes).decode().splitlines()
    for line in reversed(lines[1:] if len(lines) > 1 else lines):  # the first may be cut by the window
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # mid-append
            continue
    return None


def loss_curve_png(history: Sequence[dict[str, Any]], *, smooth: int = 20) -> bytes:
    """A PNG of the loss per step with a moving average of ``smooth`` steps, and the LR on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    losses = [row["loss"] for row in history]
    window = max(1, min(smooth, len(losses) // 5 or 1))
    averaged = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, averaged, color="tab:blue", linewidth=2, label=f"loss, {window}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [row["lr"] for row in history], color="tab:orange", linewidth=1, label="lr")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_loss_curve(run_uri: str) -> None:
    """Draw ``<run>/loss_curve.png`` from the metrics file (at checkpoints and at the end)."""
    storage.write_bytes(storage.join(run_uri, LOSS_CURVE_FILE), loss_curve_png(read_metrics(run_uri)))


@contextlib.contextmanager
def progress_from_metrics(run_uri: str, *, max_steps: int, interval_s: float = 10.0) -> Iterator[None]:
    """Progress lines on the driver from the rows rank 0 appends to the metrics file, while the block runs.

    A quiet command leaves the workers' own progress lines in Ray's log folder (sdray.console); this keeps
    `sdray train` telling a person where it is (step/total, loss, ETA) without them.
    """
    from sdray.progress import Progress

    stop = threading.Event()

    def last_row() -> dict[str, Any] | None:
        try:
            return last_metrics_row(run_uri)
        except Exception:  # not written yet: try again at the next tick
            return None

    def follow() -> None:
        before = last_row()  # a resumed run: steps already done count as done, not as speed
        progress = Progress(
            max_steps, label="train", unit="step", done=before["step"] if before else 0, interval_s=0
        )
        while not stop.wait(interval_s):
            row = last_row()
            if (
                row is not None and row["step"] != progress.done
            ):  # a line per new row, one per interval at most
                progress.update(row["step"], loss=row["loss"])

    thread = threading.Thread(target=follow, name="sdray-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s)
