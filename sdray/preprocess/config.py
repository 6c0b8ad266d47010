"""PreprocessConfig: stage 1 settings. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdray.allocator import Allocator
from sdray.data.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
from sdray.errors import ConfigError

CaptionStrategy = Literal["first", "random"]
OverLimit = Literal["crop", "reject"]


@dataclass(kw_only=True, frozen=True)
class PreprocessConfig:
    input: str = ""
    """Parquet file, directory, glob or s3:// URI of image-caption rows (comma-separated for several)."""
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
    caption_strategy: CaptionStrategy = "first"
    """For list captions: `first` non-empty one, or a `random` one chosen by a hash of the row id (stable)."""
    store_std: bool = False
    """Also store the VAE posterior std (`latent_std`) so training can sample latents, not only use the mean."""
    min_image_side: int = MIN_IMAGE_SIDE
    """Images whose shorter side is below this many pixels are rejected (`too_small`)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels than this are rejected before decoding (`too_large`, decompression-bomb guard)."""
    decode_batch_size: int = 64
    """Rows per CPU decode task (Pillow decode, EXIF, RGB, resize, crop, tokenize)."""
    decode_num_cpus: float = 1.0
    """CPUs reserved per decode task."""
    encode_batch_size: int = 16
    """Images per encoder call."""
    encode_concurrency: int = 1
    """Encoder actors (each loads the VAE and text encoder once); one per GPU on a GPU cluster."""
    encode_num_gpus: float = 1.0
    """GPUs per encoder actor when the cluster has GPUs (ignored on a CPU-only cluster: fp32 on CPU)."""
    encode_num_cpus: float = 1.0
    """CPUs Ray reserves per encoder actor (leave some for the read/decode tasks)."""
    encode_threads: int = 0
    """Torch threads of an encoder actor on CPU; 0: the machine's cores shared by the encoder actors on it (the
    pool spreads over the cluster's machines; decoding shares the cores too)."""
    encode_allocator: Allocator = "jemalloc"
    """Memory allocator of the encoder actors, as `train.allocator`: `jemalloc` (Ray's, kept from returning
    freed memory, so a batch does not fault its activations in again) or `system`. On the 2-core dev VM the
    sd15 encoders at 256 px ran 1.1 images/s instead of 0.8 (benchmarks/results/preprocess_allocator_sd15_256.md)."""
    write_num_cpus: float = 0.0
    """CPUs reserved per shard-writing task; 0 so writes (mostly I/O) never wait behind decode tasks."""
    rows_per_shard: int = 512
    """Rows per output parquet shard, at most. Shards are written as the pipeline's blocks arrive and never
    mix input files, so most hold fewer rows; a killed run loses only the blocks in flight. Input files
    smaller than this are read several to a task, up to about this many rows (Ray Data's per-block cost)."""
    buckets: bool = False
    """Aspect-ratio buckets instead of the square centre crop: each image goes to the ladder size nearest its
    aspect ratio (about resolution^2 pixels, sides multiples of bucket_step), resized to cover it, centre-cropped."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels; must be a multiple of the VAE x UNet downsampling (64 for
    SD 1.5, 16 for the tiny preset)."""
    bucket_max_aspect: float = 2.0
    """Longest bucket side / shortest; bounds the ladder (kohya's default 1024/256 allows 4)."""
    bucket_over_limit: OverLimit = "crop"
    """An image more elongated than bucket_max_aspect: `crop` it into the most elongated bucket, or `reject` it
    (reason `aspect_over_limit`)."""

    def __post_init__(self) -> None:
        if self.resolution % 8 or self.resolution <= 0:
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        positive = {
            "encode_batch_size": self.encode_batch_size,
            "decode_batch_size": self.decode_batch_size,
            "encode_concurrency": self.encode_concurrency,
            "rows_per_shard": self.rows_per_shard,
            "min_image_side": self.min_image_side,
            "max_image_pixels": self.max_image_pixels,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name, value in {
            "decode_num_cpus": self.decode_num_cpus,
            "encode_num_cpus": self.encode_num_cpus,
        }.items():
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.write_num_cpus < 0:
            raise ConfigError(f"write_num_cpus must be >= 0, got {self.write_num_cpus}")
        if self.encode_threads < 0:
            raise ConfigError(f"encode_threads must be >= 0, got {self.encode_threads}")
        if self.encode_num_gpus < 0:
            raise ConfigError(f"encode_num_gpus must be >= 0, got {self.encode_num_gpus}")
        if self.buckets and not (self.bucket_step % 8 == 0 and 0 < self.bucket_step <= self.resolution):
            raise ConfigError(
                f"bucket_step must be a positive multiple of 8 and <= resolution, got {self.bucket_step}"
            )
        if self.bucket_max_aspect < 1.0:
            raise ConfigError(f"bucket_max_aspect must be >= 1, got {self.bucket_max_aspect}")
        columns = (self.image_column, self.caption_column, self.id_column)
        if not all(columns) or len(set(columns)) != len(columns):
            raise ConfigError(f"image/caption/id columns must be distinct and non-empty, got {columns}")
