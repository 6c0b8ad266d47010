"""Aspect-ratio buckets in stage 1 (`preprocess.buckets`): the decode stage's pixel layouts, encoding a batch
bucket by bucket, and one shard per (input file, bucket).

Between stages a bucketed batch keeps one array per column, as Ray Data needs: ``pixels`` is uint8
(N, 3*R*R) with row i's (3, h, w) pixels flattened at its start (every bucket has at most R*R pixels), and
the encoder's ``latent`` is float16 (N, C*(R/f)^2) likewise; ``bucket_h``/``bucket_w`` (N,) say each row's
shape, ``original_size`` (N, 2) and ``crop_box`` (N, 4) where it came from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from sdray.data import buckets, cache, rejects
from sdray.data.images import decode_pixels, load_rgb
from sdray.data.rejects import Rejected
from sdray.models.config import ModelConfig, saved_architecture
from sdray.models.presets import PRESETS
from sdray.preprocess.config import PreprocessConfig

Batch = dict[str, np.ndarray]


def unet_down_blocks(model: ModelConfig) -> int:
    """Down blocks of the model's UNet, from its config alone (preset, or `unet/config.json` of model.path)."""
    if model.path:
        return len(saved_architecture(model.path, "unet")["down_block_types"])
    return len({**PRESETS[model.preset]["unet"], **model.unet}["down_block_types"])


def ladder(pre: PreprocessConfig) -> tuple[buckets.Bucket, ...]:
    """The configured bucket ladder."""
    return buckets.bucket_ladder(pre.resolution, pre.bucket_step, pre.bucket_max_aspect)


class SquareLayout:
    """Today's square centre crop: ``pixels`` (N, 3, R, R)."""

    def __init__(self, pre: PreprocessConfig, n: int) -> None:
        self.resolution = pre.resolution
        self.pixels = np.zeros((n, 3, pre.resolution, pre.resolution), np.uint8)

    def put(self, i: int, image: Image.Image) -> None:
        self.pixels[i] = decode_pixels(image, self.resolution)

    def columns(self) -> Batch:
        return {"pixels": self.pixels}


class BucketLayout:
    """Each image to its nearest bucket: cover resize, centre crop; records bucket, original size, crop box."""

    def __init__(self, pre: PreprocessConfig, n: int) -> None:
        self.pre, self.ladder = pre, ladder(pre)
        self.draft_side = max(max(b) for b in self.ladder)
        self.pixels = np.zeros((n, 3 * pre.resolution**2), np.uint8)
        self.bucket = np.zeros((n, 2), np.int32)
        self.original = np.zeros((n, 2), np.int32)
        self.crop = np.zeros((n, 4), np.int32)

    def put(self, i: int, image: Image.Image) -> None:
        """Crop ``image`` into row ``i``; raises Rejected (aspect_over_limit) when configured to."""
        header = image.size  # (W, H) before a JPEG draft shrinks it and before EXIF rotation
        rgb = load_rgb(image, self.draft_side)
        width, height = rgb.size
        over = buckets.beyond_limit(height, width, self.pre.bucket_max_aspect)
        if over and self.pre.bucket_over_limit == "reject":
            raise Rejected(
                rejects.ASPECT_OVER_LIMIT, f"{width}x{height} beyond {self.pre.bucket_max_aspect:g}:1"
            )
        plan = buckets.cover_crop(height, width, buckets.nearest_bucket(height, width, self.ladder))
        rotated = (width > height) != (header[0] > header[1])
        original = (header[0], header[1]) if rotated else (header[1], header[0])  # (H, W) as oriented
        plan = dataclasses.replace(plan, original=original)
        if plan.resized != (height, width):
            rgb = rgb.resize((plan.resized[1], plan.resized[0]), Image.BICUBIC, reducing_gap=3.0)
        pixels = np.asarray(rgb.crop(plan.box), dtype=np.uint8).transpose(2, 0, 1)  # (3, h, w)
        self.pixels[i, : pixels.size] = pixels.reshape(-1)
        self.bucket[i], self.original[i], self.crop[i] = plan.bucket, plan.original, plan.original_box

    def columns(self) -> Batch:
        return {
            "pixels": self.pixels,
            cache.BUCKET_H: self.bucket[:, 0],
            cache.BUCKET_W: self.bucket[:, 1],
            cache.ORIGINAL_SIZE: self.original,
            cache.CROP_BOX: self.crop,
        }


def pixel_layout(pre: PreprocessConfig, n: int) -> SquareLayout | BucketLayout:
    """The decode stage's output layout for ``n`` rows."""
    return BucketLayout(pre, n) if pre.buckets else SquareLayout(pre, n)


def _groups(batch: Batch, rows: np.ndarray) -> list[tuple[buckets.Bucket, np.ndarray]]:
    """(bucket, positions in ``rows``) for each bucket present among ``rows``, in a fixed order."""
    hs, ws = batch[cache.BUCKET_H][rows], batch[cache.BUCKET_W][rows]
    found = sorted(set(zip(hs.tolist(), ws.tolist(), strict=True)))
    return [((h, w), np.flatnonzero((hs == h) & (ws == w))) for h, w in found]


def encode_by_bucket(
    encode: Callable[[np.ndarray, np.ndarray], Batch], batch: Batch, good: np.ndarray, info: cache.CacheInfo
) -> Batch:
    """Run ``encode(pixels (B, 3, h, w), input_ids)`` once per bucket of the ``good`` rows.

    Returns:
        Arrays over ``good``: latents flattened and zero-padded to (len(good), C*(R/f)^2), others as given.
    """
    out: Batch = {}
    for (h, w), pos in _groups(batch, good):
        rows = good[pos]
        encoded = encode(batch["pixels"][rows, : 3 * h * w].reshape(-1, 3, h, w), batch["input_ids"][rows])
        for name, values in encoded.items():
            flat = name in (cache.LATENT, cache.LATENT_STD)
            if name not in out:
                shape = (math.prod(info.latent_shape),) if flat else values.shape[1:]
                out[name] = np.zeros((len(good), *shape), np.float32)
            if flat:
                out[name][pos, : values[0].size] = values.reshape(len(rows), -1)
            else:
                out[name][pos] = values
    return out


def stage_shapes(info: cache.CacheInfo) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the tensor columns between stages (bucketed latents travel flattened)."""
    shapes = cache.tensor_columns(info)
    if info.buckets:
        for name in (cache.LATENT, cache.LATENT_STD):
            if name in shapes:
                shapes[name] = (math.prod(shapes[name]),)
    return shapes


def bucket_tables(batch: Batch, good: list[int], info: cache.CacheInfo) -> list[tuple[str, object]]:
    """(bucket label, pyarrow table) for each bucket among the ``good`` rows of one input file."""
    rows = np.asarray(good)
    tables = []
    for bucket, pos in _groups(batch, rows):
        idx = rows[pos]
        shape = info.row_latent_shape(*bucket)
        names = (cache.LATENT, cache.LATENT_STD) if info.has_std else (cache.LATENT,)
        columns = {name: batch[name][idx, : math.prod(shape)].reshape(len(idx), *shape) for name in names}
        columns[cache.ID] = [batch["id"][i] for i in idx]
        columns[cache.CAPTION] = [batch["caption"][i] for i in idx]
        columns[cache.TEXT_EMBEDS] = batch["text_embeds"][idx]
        columns[cache.ORIGINAL_SIZE] = batch[cache.ORIGINAL_SIZE][idx]
        columns[cache.CROP_BOX] = batch[cache.CROP_BOX][idx]
        tables.append((buckets.label(bucket), cache.to_bucket_table(info, bucket, columns)))
    return tables
