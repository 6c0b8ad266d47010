"""Pure per-row functions of the CPU stage: decode, EXIF orientation, RGB, resize + center crop, captions.

No Ray, no torch: each function takes plain values and returns plain values or raises
:class:`~sdray.data.rejects.Rejected` with a reason code.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdray.data import rejects
from sdray.data.rejects import Rejected

_WHITE = (255, 255, 255)
MIN_IMAGE_SIDE = 32
"""Default shortest side accepted (`preprocess.min_image_side`; the VAE stage uses it as is)."""
MAX_IMAGE_PIXELS = 100_000_000
"""Default pixel limit checked before decoding (`preprocess.max_image_pixels`; the VAE stage uses it as is)."""


def open_checked(data: bytes | None, *, min_side: int, max_pixels: int) -> Image.Image:
    """Open image bytes, check the header's size, then decode the pixels (after a JPEG draft hint).

    Raises:
        Rejected: missing_image, empty_image, not_an_image, too_large, too_small, truncated, corrupt.
    """
    if data is None:
        raise Rejected(rejects.MISSING_IMAGE)
    if len(data) == 0:
        raise Rejected(rejects.EMPTY_IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected(rejects.TOO_LARGE, str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected(rejects.NOT_AN_IMAGE, f"{len(data)} bytes, unknown format") from None
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: Pillow's plugins raise many kinds
            raise Rejected(_decode_reason(exc), f"header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(rejects.TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
    if min(width, height) < min_side:
        raise Rejected(rejects.TOO_SMALL, f"{width}x{height}, shorter side < {min_side}")
    return image


def decode_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """Decode an opened image to a (3, resolution, resolution) uint8 array: EXIF, RGB, resize, crop.

    Raises:
        Rejected: truncated or corrupt pixel data.
    """
    square = resize_center_crop(load_rgb(image, resolution), resolution)
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, R, R)


def load_rgb(image: Image.Image, draft_side: int) -> Image.Image:
    """Decode the pixels (JPEGs at >= ``draft_side`` on both sides), apply EXIF orientation, convert to RGB.

    Raises:
        Rejected: truncated or corrupt pixel data.
    """
    if image.format == "JPEG":
        image.draft("RGB", (draft_side, draft_side))  # DCT-domain downscale: big JPEGs decode much faster
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: Pillow's plugins raise many kinds
        raise Rejected(_decode_reason(exc), f"{type(exc).__name__}: {exc}") from None
    return to_rgb(image)


def _decode_reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return rejects.TOO_LARGE
    truncated = isinstance(exc, EOFError) or "truncat" in str(exc).lower()
    return rejects.TRUNCATED if truncated else rejects.CORRUPT


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any Pillow mode: palette/alpha composited on white, CMYK converted, 16/32-bit scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((grey.astype(np.float32) / 257.0).round().astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # "I" PNGs are 16-bit values in 32-bit ints
        grey = (values.clip(0, top) * (255.0 / top)).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def normalise(pixels: Any) -> Any:
    """uint8 pixels (numpy array or torch tensor, any shape) -> float in [-1, 1], the VAE's input range.

    Applied in the encoder, not the CPU stage, so the object store moves 1 byte per channel, not 4.
    """
    return pixels / 127.5 - 1.0


def pick_caption(value: Any, strategy: str, row_id: str) -> str:
    """One caption from a string or a list of strings.

    ``first``: the first non-blank entry. ``random``: a non-blank entry chosen by a hash of ``row_id``, so a
    re-run picks the same one (idempotent output).

    Raises:
        Rejected: missing_caption (null, or a list of no strings) or empty_caption (all blank).
    """
    if value is None:
        raise Rejected(rejects.MISSING_CAPTION)
    if isinstance(value, str):
        if not value.strip():
            raise Rejected(rejects.EMPTY_CAPTION)
        return value
    candidates = [c for c in value if isinstance(c, str)]
    if not candidates:
        raise Rejected(rejects.MISSING_CAPTION, "no strings in the caption list")
    usable = [c for c in candidates if c.strip()]
    if not usable:
        raise Rejected(rejects.EMPTY_CAPTION, f"{len(candidates)} blank caption(s)")
    if strategy == "first":
        return usable[0]
    digest = hashlib.sha1(row_id.encode()).digest()
    return usable[int.from_bytes(digest[:8], "big") % len(usable)]
