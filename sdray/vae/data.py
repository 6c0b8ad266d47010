"""Images for VAE training through Ray Data: read the parquet, split by id hash, decode to uint8 pixels.

The pure functions (`decode_image`, `decode_batch`) know nothing of Ray and decode with the preprocessing
stage's own functions (`sdray.data.images`), so the VAE trains on exactly the pixels it will later
encode; `image_datasets` holds the only `map_batches` wiring. Pixels travel as uint8 (4x smaller than
float32) and become floats in [-1, 1] on the worker (`to_model_input`).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdray import storage
from sdray.data.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, decode_pixels, normalise, open_checked
from sdray.data.reader import read_parquet_files
from sdray.data.rejects import Rejected
from sdray.errors import InputError
from sdray.vae.config import VaeTrainConfig

log = logging.getLogger(__name__)

PIXELS = "pixels"
Split = Literal["train", "val"]


def decode_image(data: bytes | None, resolution: int) -> np.ndarray:
    """Encoded image bytes -> (3, resolution, resolution) uint8, exactly as `sdray preprocess` decodes
    (EXIF orientation, RGB, shorter side resized, centre crop, the same size limits).

    Raises:
        Rejected: the reason code preprocessing would log (not_an_image, too_small, corrupt, ...).
    """
    image = open_checked(data, min_side=MIN_IMAGE_SIDE, max_pixels=MAX_IMAGE_PIXELS)
    return decode_pixels(image, resolution)


def in_holdout(row_id: str, fraction: float) -> bool:
    """Whether a row is held out: a stable hash of its id, so the split never depends on file order."""
    return zlib.crc32(str(row_id).encode()) % 10_000 < fraction * 10_000


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):  # Hugging Face layout: {bytes, path}
        column = column.field("bytes")
    return column.to_pylist()


def decode_batch(batch: pa.Table, *, cfg: VaeTrainConfig, split: Split) -> dict[str, np.ndarray]:
    """Keep the rows of ``split`` and decode them; undecodable images are logged and dropped.

    Returns:
        {"pixels": (N, 3, R, R) uint8}.
    """
    ids = [str(i) for i in batch.column(cfg.id_column).to_pylist()]
    images = _image_bytes(batch.column(cfg.image_column))
    pixels = []
    for row_id, data in zip(ids, images, strict=True):
        if in_holdout(row_id, cfg.holdout_fraction) != (split == "val"):
            continue
        try:
            pixels.append(decode_image(data, cfg.resolution))
        except Rejected as exc:  # skipped, not fatal: the VAE only needs enough good images
            log.warning("row %s: image skipped: %s", row_id, exc)
    shape = (len(pixels), 3, cfg.resolution, cfg.resolution)
    return {PIXELS: np.stack(pixels) if pixels else np.zeros(shape, np.uint8)}


def check_data_path(cfg: VaeTrainConfig) -> None:
    """Fail fast (before Ray starts) on an empty or missing local input path."""
    if not cfg.data:
        raise InputError("vae_train.data is empty: give the image parquet (--data)")
    if "://" not in cfg.data and not any(c in cfg.data for c in "*?[") and not Path(cfg.data).exists():
        raise InputError(f"vae_train.data {cfg.data}: no such file or directory")


def _source(cfg: VaeTrainConfig):
    """The id and image columns of ``cfg.data``'s parquet files, a read task per file (see
    `read_parquet_files`: Ray's default reader starts footer-reading actors at every pass over the data)."""
    fs, path = storage.resolve(cfg.data)
    try:
        files = [info.path for info in storage.parquet_files(fs, path)]
        if not files:
            raise InputError(f"vae_train.data {cfg.data}: no .parquet files")
        with fs.open_input_file(files[0]) as f:
            names = set(pq.read_schema(f).names)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"vae_train.data {cfg.data}: cannot read parquet: {exc}") from exc
    missing = [c for c in (cfg.id_column, cfg.image_column) if c not in names]
    if missing:
        raise InputError(f"{files[0]}: missing column(s) {missing} (has {sorted(names)})")
    return read_parquet_files(files, filesystem=fs, columns=[cfg.id_column, cfg.image_column])


def image_datasets(cfg: VaeTrainConfig):
    """(train, val) Ray Datasets of decoded images; materialized when ``cfg.materialize``."""
    check_data_path(cfg)
    source = _source(cfg)
    datasets = []
    for split in ("train", "val"):
        ds = source.map_batches(
            decode_batch, fn_kwargs={"cfg": cfg, "split": split}, batch_format="pyarrow", batch_size=256
        )
        datasets.append(ds.materialize() if cfg.materialize else ds)
    return tuple(datasets)


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) uint8 -> float32 in [-1, 1]."""
    return normalise(pixels.float())
