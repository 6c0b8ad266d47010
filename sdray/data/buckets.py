"""Aspect-ratio buckets: the ladder of (height, width) sizes, assigning an image to one, and the crop geometry.

Pure functions (no Pillow, torch or Ray), shared by preprocessing, training, serving and the benchmark.

The ladder follows kohya's sd-scripts (`make_bucket_resolutions`): every bucket has about the area of the
square ``resolution x resolution`` (never more, so batches cost about the same), its sides are multiples of
``step`` pixels, and its longer side is at most ``max_aspect`` times the shorter. Each image goes to the
bucket nearest its aspect ratio (distance in log space, so 2:1 and 1:2 are equally far from 1:1), is resized
to cover the bucket and centre-cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Bucket = tuple[int, int]
"""(height, width) in pixels."""


def bucket_ladder(resolution: int, step: int, max_aspect: float) -> tuple[Bucket, ...]:
    """All buckets of area <= ``resolution**2``, sides multiples of ``step``, aspect <= ``max_aspect``.

    Returns:
        (height, width) pairs sorted from the tallest to the widest; always holds the square bucket.
    """
    if step <= 0 or resolution < step:
        raise ValueError(f"need 0 < step <= resolution, got step {step}, resolution {resolution}")
    area = resolution * resolution
    side = resolution // step * step
    widest: dict[int, int] = {side: side}  # height -> the widest width with that height
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step  # rounded down: no bucket costs more than the square
        if height >= step and max(width, height) / min(width, height) <= max_aspect + 1e-9:
            widest[height] = max(widest.get(height, 0), width)  # several widths round to one height
    found = {(h, w) for h, w in widest.items()} | {(w, h) for h, w in widest.items()}
    return tuple(sorted(found, key=lambda b: (b[1] / b[0], b[0])))


def label(bucket: Bucket) -> str:
    """``"HxW"``, the bucket's name in `_cache.json`, shard names and summaries."""
    return f"{bucket[0]}x{bucket[1]}"


def parse_label(text: str) -> Bucket:
    height, width = text.split("x")
    return int(height), int(width)


def aspect_distance(height: int, width: int, bucket: Bucket) -> float:
    """|log(aspect of the image) - log(aspect of the bucket)|: 0 for the same shape."""
    return abs(math.log(width / height) - math.log(bucket[1] / bucket[0]))


def nearest_bucket(height: int, width: int, ladder: tuple[Bucket, ...]) -> Bucket:
    """The bucket nearest in aspect ratio to an image of ``height x width`` (ties: the first in the ladder)."""
    return min(ladder, key=lambda b: aspect_distance(height, width, b))


def beyond_limit(height: int, width: int, max_aspect: float) -> bool:
    """Whether the image is more elongated than the ladder allows (it loses more than the ladder's worst)."""
    return max(height, width) / min(height, width) > max_aspect + 1e-9


@dataclass(frozen=True)
class CoverCrop:
    """How an image of ``original`` size becomes ``bucket``: resize to ``resized``, crop ``box`` of it."""

    original: Bucket
    """(height, width) of the source image (after EXIF orientation)."""
    resized: Bucket
    """(height, width) after the cover resize: both sides >= the bucket's."""
    bucket: Bucket
    """(height, width) of the output."""
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) of the crop in the resized image."""

    @property
    def original_box(self) -> tuple[int, int, int, int]:
        """The crop box mapped back to source-image pixels (rounded): the part of the image that was kept."""
        sy, sx = self.original[0] / self.resized[0], self.original[1] / self.resized[1]
        left, top, right, bottom = self.box
        return round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)

    @property
    def kept_share(self) -> float:
        """Fraction of the source image's pixels inside the crop (1.0: nothing cut off)."""
        left, top, right, bottom = self.box
        return (right - left) * (bottom - top) / (self.resized[0] * self.resized[1])


def cover_crop(height: int, width: int, bucket: Bucket) -> CoverCrop:
    """Scale so the image covers ``bucket`` (the smallest scale that does), then take the centre."""
    scale = max(bucket[0] / height, bucket[1] / width)
    resized = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    top, left = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    box = (left, top, left + bucket[1], top + bucket[0])
    return CoverCrop(original=(height, width), resized=resized, bucket=bucket, box=box)


def size_multiple(vae_downsample: int, unet_down_blocks: int) -> int:
    """Pixels a bucket side must be a multiple of: the VAE's factor times the UNet's 2x downsamplings."""
    return vae_downsample * 2 ** max(unet_down_blocks - 1, 0)


def nearest_trained(height: int, width: int, buckets: tuple[Bucket, ...], tolerance: float) -> Bucket | None:
    """The trained bucket nearest in aspect ratio, if the request is close to it, else None.

    Close: aspect ratios within ``tolerance`` in log space (0.25 is about 28%) and areas within 2x of each
    other (a UNet sees its trained feature-map sizes; far larger or smaller images lose composition).
    """
    if not buckets:
        return None
    bucket = nearest_bucket(height, width, buckets)
    area_ratio = height * width / (bucket[0] * bucket[1])
    near = aspect_distance(height, width, bucket) <= tolerance + 1e-9 and 0.5 <= area_ratio <= 2.0
    return bucket if near else None
