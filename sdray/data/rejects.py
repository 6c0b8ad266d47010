"""Why a row was not written: reason codes, the exception that carries one, and the reject log format.

Every input row ends either in a shard or in the reject log (`_rejects/<unit>.jsonl`, one JSON object per
line: id, reason, detail, input). A row gets the reason of the first check it fails, in this order:
id, caption, then image (bytes, header, size, pixels), then the encoder's output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

MISSING_ID = "missing_id"
"""The row id is null (the reject log then records id null)."""
MISSING_CAPTION = "missing_caption"
"""The caption is null (or a list with no strings)."""
EMPTY_CAPTION = "empty_caption"
"""The caption is blank after stripping whitespace (for a list: every entry is)."""
MISSING_IMAGE = "missing_image"
"""The image (or its `bytes` field) is null."""
EMPTY_IMAGE = "empty_image"
"""Zero-byte image."""
NOT_AN_IMAGE = "not_an_image"
"""Pillow does not recognise the bytes as any image format."""
CORRUPT = "corrupt"
"""The header parses but the pixel data does not decode."""
TRUNCATED = "truncated"
"""The file ends before the pixel data does."""
TOO_SMALL = "too_small"
"""Shorter side below `preprocess.min_image_side`."""
TOO_LARGE = "too_large"
"""More pixels than `preprocess.max_image_pixels` (decompression-bomb guard); never decoded."""
ASPECT_OVER_LIMIT = "aspect_over_limit"
"""Aspect ratio beyond `preprocess.bucket_max_aspect` with `bucket_over_limit: reject`."""
NONFINITE_OUTPUT = "nonfinite_output"
"""The VAE latent or text embedding holds NaN/inf (e.g. fp16 overflow)."""

REASONS = (
    MISSING_ID,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    EMPTY_IMAGE,
    NOT_AN_IMAGE,
    CORRUPT,
    TRUNCATED,
    TOO_SMALL,
    TOO_LARGE,
    NONFINITE_OUTPUT,
)
BUCKET_REASONS = (ASPECT_OVER_LIMIT,)
"""Reasons only `preprocess.buckets` can give."""


class Rejected(Exception):
    """A row cannot be used; ``reason`` is one of REASONS, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def reject_log_lines(rows: Iterable[dict[str, str]]) -> bytes:
    """JSONL bytes of reject records (each a dict with id, reason, detail, input)."""
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)
