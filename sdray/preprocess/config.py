"""PreprocessConfig: stage 1 settings. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class PreprocessConfig:
    input: str = ""
    """Parquet file, directory, glob or s3:// URI of image-caption rows."""
    output: str = ""
    """Directory (or s3:// URI) of the latent cache."""
    resolution: int = 512
    """Side of the square center crop, pixels; latents are resolution // vae_downsample."""
    image_column: str = "image"
    """Column with image bytes or the {bytes, path} struct."""
    caption_column: str = "caption"
    """Column with a caption string or a list of strings."""
    id_column: str = "id"
    """Column with a unique row id (string or integer)."""
    encode_batch_size: int = 16
    """Images per encoder call."""

    def __post_init__(self) -> None:
        if self.resolution % 8 or self.resolution <= 0:
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.encode_batch_size < 1:
            raise ConfigError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
