"""Recover a synthetic scene's attributes (colour, shape, position) from pixels alone.

The measurement uses no model, so it cannot share the blind spots of the model it scores:
- foreground: pixels whose largest channel difference from the background colour (the median of the image
  border) exceeds a threshold, cleaned by a 3x3 majority filter so isolated noise pixels do not count;
- colour: each foreground pixel votes for the palette colour of nearest hue, weighted by saturation x value
  (dark anti-aliased edges and grey noise carry little weight);
- position: the quadrant (of `sdray.data.synth.POSITIONS`) nearest to the foreground centroid;
- shape: the fill ratio of the foreground's bounding box (square ~0.99, circle ~0.78, triangle ~0.56).

An image with too little foreground gets None for every attribute (scored as wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.colors import rgb_to_hsv

from sdray.data.synth import COLORS, POSITIONS, SHAPES

EVALUATED = ("color", "shape", "position")
# Fill ratio of each shape's bounding box, the median over 3,000 rendered 64px scenes (ideal: 0.5, pi/4, 1;
# rasterisation and triangles clipped at the image edge, up to 0.65, move them). Nearest prototype wins.
FILL_RATIO = {"triangle": 0.56, "circle": 0.78, "square": 0.99}


@dataclass(kw_only=True, frozen=True)
class Recovered:
    """Attributes read from one image; None where the image shows no usable foreground."""

    color: str | None
    shape: str | None
    position: str | None
    fill_ratio: float
    """Foreground pixels / bounding-box pixels (0 without foreground)."""
    foreground_fraction: float
    """Foreground pixels / all pixels."""

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in EVALUATED}


def _hue(rgb: tuple[int, int, int]) -> float:
    return float(rgb_to_hsv(np.asarray(rgb, dtype=np.float64) / 255.0)[0])


PALETTE_HUES = {name: _hue(rgb) for name, rgb in COLORS.items()}


def to_uint8_rgb(image) -> np.ndarray:
    """A PIL image or an array ((H, W, 3) uint8, or float in [0, 1]) as an (H, W, 3) uint8 array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return array


def foreground_mask(rgb: np.ndarray, *, threshold: float = 0.25) -> np.ndarray:
    """(H, W) bool: pixels far from the border colour, after a 3x3 majority filter.

    Args:
        rgb: (H, W, 3) uint8.
        threshold: largest per-channel difference from the background, as a fraction of 255.
    """
    pixels = rgb.astype(np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (4W, 3)
    background = np.median(border, axis=0)
    raw = np.abs(pixels - background).max(axis=-1) > threshold  # (H, W)
    padded = np.pad(raw, 1).astype(np.uint8)
    h, w = raw.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def _color(rgb: np.ndarray, mask: np.ndarray) -> str:
    hsv = rgb_to_hsv(rgb[mask].astype(np.float64) / 255.0)  # (N, 3), each in [0, 1]
    names = list(PALETTE_HUES)
    hues = np.array([PALETTE_HUES[n] for n in names])  # (K,)
    distance = np.abs(hsv[:, :1] - hues[None, :])  # (N, K), hue is circular
    nearest = np.minimum(distance, 1.0 - distance).argmin(axis=1)
    votes = np.bincount(nearest, weights=hsv[:, 1] * hsv[:, 2], minlength=len(names))
    return names[int(votes.argmax())]


def _position(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def _fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(mask.sum() / box)


def _shape(fill_ratio: float) -> str:
    return min(SHAPES, key=lambda s: abs(FILL_RATIO[s] - fill_ratio))


def recover(image, *, threshold: float = 0.25, min_foreground: float = 0.005) -> Recovered:
    """Read colour, shape and position from one image (PIL, or an (H, W, 3) uint8/[0, 1] float array).

    Args:
        threshold: foreground threshold (see :func:`foreground_mask`).
        min_foreground: below this fraction of foreground pixels every attribute is None.
    """
    rgb = to_uint8_rgb(image)
    mask = foreground_mask(rgb, threshold=threshold)
    fraction = float(mask.mean())
    if fraction < min_foreground:
        return Recovered(color=None, shape=None, position=None, fill_ratio=0.0, foreground_fraction=fraction)
    fill = _fill_ratio(mask)
    return Recovered(
        color=_color(rgb, mask),
        shape=_shape(fill),
        position=_position(mask),
        fill_ratio=fill,
        foreground_fraction=fraction,
    )
