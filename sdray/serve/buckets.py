"""The trained aspect-ratio buckets of a model directory, and whether a requested size is near one. Light.

A model trained on a bucketed cache records its ladder and rows per bucket in `sdray_train.yaml`
(`cache_info.buckets`, `bucket_counts`, written by export); the buckets that held rows are the trained ones.
A request far from every trained bucket is refused with the list (`serve.off_bucket: refuse`), or runs with
a warning in the log (`warn`). A model without recorded buckets accepts any valid size.
"""

from __future__ import annotations

import logging

import yaml

from sdray.data.buckets import Bucket, label, nearest_trained
from sdray.models.config import TRAIN_INFO_FILE

log = logging.getLogger(__name__)


def trained_buckets(model_dir: str) -> tuple[Bucket, ...]:
    """(height, width) buckets recorded in ``model_dir``/sdray_train.yaml; () when none are recorded."""
    from sdray import storage

    if not model_dir or model_dir.startswith("preset:"):
        return ()
    uri = storage.join(model_dir, TRAIN_INFO_FILE)
    if not storage.exists(uri):
        return ()
    info = (yaml.safe_load(storage.read_bytes(uri)) or {}).get("cache_info") or {}
    ladder = tuple(tuple(b) for b in info.get("buckets") or ())
    counts = info.get("bucket_counts")
    if not counts:  # recorded before per-bucket counts: the whole ladder
        return ladder
    return tuple(b for b in ladder if counts.get(label(b), 0) > 0)  # a bucket with no rows was never trained


def size_problem(
    height: int, width: int, trained: tuple[Bucket, ...], *, tolerance: float, refuse: bool
) -> str:
    """A message when ``height x width`` is far from every trained bucket and the policy refuses; else ""."""
    if not trained or nearest_trained(height, width, trained, tolerance) is not None:
        return ""
    names = ", ".join(f"{w}x{h}" for h, w in trained)  # WxH, as requests spell sizes
    message = f"{width}x{height} is far from the sizes this model was trained at ({names})"
    if refuse:
        return f"{message}; ask for one of them, or set serve.off_bucket: warn"
    log.warning("%s; generating anyway (serve.off_bucket: warn)", message)
    return ""
