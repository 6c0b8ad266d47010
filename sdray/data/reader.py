"""Open a latent cache (written by `sdray preprocess`) as a Ray Dataset, refusing caches the model cannot use.

Everything goes through pyarrow file systems, so a cache on s3:// is read the same way as a local one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from sdray import storage
from sdray.data import buckets, cache
from sdray.errors import InputError

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ExpectedCache:
    """What the model being trained needs from a cache."""

    encoder_fingerprint: str
    """Fingerprint of the model's VAE + text encoder (sdray.models.fingerprint)."""
    resolution: int
    """Image side in pixels the UNet is trained at."""
    latent_channels: int
    """UNet in_channels."""
    text_embed_dim: int
    """UNet cross_attention_dim."""
    model_source: str = ""
    """Where the model comes from, for messages."""


@dataclass(frozen=True)
class LatentCache:
    """An opened cache: its committed shards, metadata and the empty-caption embedding (no rows read yet)."""

    info: cache.CacheInfo
    empty_caption: np.ndarray  # (77, D) float16
    num_rows: int
    num_bytes: int
    """Size of the committed parquet shards."""
    fs: pafs.FileSystem
    shards: tuple[str, ...]
    bucket_counts: dict[str, int] = field(default_factory=dict)
    """Rows per bucket ("HxW"), counted from the shards; empty for a square cache."""

    def stream(self) -> object:
        """The tensor columns as a lazily read ray.data.Dataset, each (prod(shape),) float16 per row. Square
        caches only: a bucketed cache's rows have several shapes (workers read it with
        sdray.train.bucket_batcher)."""
        if self.info.buckets:
            raise ValueError("a bucketed cache cannot be streamed with Ray Data")
        columns = list(cache.tensor_columns(self.info))
        return read_parquet_files(list(self.shards), filesystem=self.fs, columns=columns)


def check_compatible(info: cache.CacheInfo, expected: ExpectedCache, *, where: str) -> None:
    """Raise InputError, stating both values, if the cache was made for another model or resolution."""
    if info.encoder_fingerprint != expected.encoder_fingerprint:
        raise InputError(
            f"{where}: cache was encoded with encoders {info.encoder_fingerprint[:16]}... "
            f"({info.model_source or 'unknown source'}), but the model config has encoders "
            f"{expected.encoder_fingerprint[:16]}... ({expected.model_source}); re-run `sdray preprocess` "
            "with this model config"
        )
    if info.resolution != expected.resolution:
        raise InputError(
            f"{where}: cache resolution is {info.resolution}px but training expects {expected.resolution}px "
            "(set train.resolution or re-run `sdray preprocess` at that resolution)"
        )
    if info.latent_shape[0] != expected.latent_channels:
        raise InputError(
            f"{where}: cache latents have {info.latent_shape[0]} channels, the UNet expects "
            f"{expected.latent_channels}"
        )
    if info.text_embeds_shape[1] != expected.text_embed_dim:
        raise InputError(
            f"{where}: cache text embeddings have width {info.text_embeds_shape[1]}, the UNet's "
            f"cross_attention_dim is {expected.text_embed_dim}"
        )


def _shard_rows(fs: pafs.FileSystem, shard: str) -> int:
    import pyarrow.parquet as pq

    with fs.open_input_file(shard) as f:
        return pq.ParquetFile(f).metadata.num_rows


def committed_shards(path: str, shards: list[str]) -> list[str]:
    """The shards a finished `sdray preprocess` run committed; refuses a cache whose preprocessing stopped.

    A cache written by `sdray preprocess` (it has the stage's `_config.yaml`) gets `_summary.json` when a run
    completes and lists each finished input file's shards in `_manifest/`; shards of an input file still in
    progress when a run was killed are not listed and must not be trained on. A shard of a *finished* input
    file that its record does not list (an orphan: a retried write task's other split of the same rows) is
    skipped with a warning. Caches made by other tools (no `_config.yaml`) are read whole.
    """
    location = storage.Location(path)
    if not location.exists(cache.CONFIG_FILE):
        return shards
    if not location.exists(cache.SUMMARY_FILE):  # written when a run completes
        raise InputError(
            f"{path}: preprocessing did not finish (no {cache.SUMMARY_FILE}); rerun `sdray preprocess` with the "
            "same output to complete it"
        )
    records = cache.read_manifest(location)
    listed = {location.path(name) for record in records.values() for name in record.shards}
    unlisted = sorted(set(shards) - listed)
    orphans = [s for s in unlisted if cache.shard_unit(s.rsplit("/", 1)[-1]) in records]
    if orphans:
        log.warning("%s: skipping %d shard(s) not listed by their finished input file", path, len(orphans))
    unlisted = sorted(set(unlisted) - set(orphans))
    if unlisted:
        raise InputError(
            f"{path}: preprocessing did not finish ({len(unlisted)} shard(s) of unfinished input files, e.g. "
            f"{unlisted[0].rsplit('/', 1)[-1]}); rerun `sdray preprocess` with the same output to complete it"
        )
    return sorted(set(shards) - set(orphans))


def cache_shards(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The file system and the committed parquet shards of the cache at ``path`` (sorted)."""
    fs = storage.Location(path).fs
    shards = [
        f.path
        for f in storage.list_files(path)
        if f.base_name.endswith(".parquet") and not f.base_name.startswith(("_", "."))
    ]
    if not shards:
        raise InputError(f"{path}: latent cache has no parquet shards (empty data set)")
    return fs, sorted(committed_shards(path, shards))


def open_cache(path: str, expected: ExpectedCache, info: cache.CacheInfo | None = None) -> LatentCache:
    """Validate the cache at ``path`` against ``expected`` and list its committed shards.

    ``info``: the cache's `_cache.json` if the caller has read it already. Rows are not loaded here (parquet
    footers only): training reads them into memory or streams them (`LatentCache.stream`).
    """
    info = info or cache.read_cache_info(path)
    check_compatible(info, expected, where=path)
    empty = cache.read_empty_caption(path, info)
    fs, shards = cache_shards(path)
    num_rows = sum(_shard_rows(fs, shard) for shard in shards)
    if num_rows == 0:
        raise InputError(f"{path}: latent cache has 0 rows (empty data set)")
    num_bytes = sum(f.size for f in fs.get_file_info(shards))
    from sdray.cluster import ensure_ray

    ensure_ray()  # only now: a wrong path or an incompatible cache costs no Ray start-up
    counts = count_buckets(fs, shards) if info.buckets else {}
    log.info(
        "latent cache %s: %d rows (%.1f MB), %s, text %s",
        path,
        num_rows,
        num_bytes / 2**20,
        f"buckets {counts}" if counts else f"latents {info.latent_shape}",
        info.text_embeds_shape,
    )
    return LatentCache(
        info=info,
        empty_caption=empty,
        num_rows=num_rows,
        num_bytes=num_bytes,
        fs=fs,
        shards=tuple(shards),
        bucket_counts=counts,
    )


def read_parquet_files(
    paths: list[str],
    *,
    filesystem: pafs.FileSystem,
    columns: list[str],
    include_paths: bool = False,
    tasks: int = 0,
):
    """``ray.data.read_parquet`` with a read task per file (or ``tasks`` read tasks), each yielding its own blocks.

    Ray 2.60's default parquet reader (DataSourceV2) lists the files in a task of its own and plans reads in
    buckets of at least 1 MiB of files, so a set of small files went through a single task into one block:
    a preprocessing run over small files then wrote nothing until its last second, and the listing task cost
    a worker start per dataset. The V1 reader, which `DataContext.use_datasource_v2` documents as the
    alternative, reads each file in a task of its own, or the files in ``tasks`` contiguous groups of equal
    count (at most one task per file). The flag is read
    when the read is planned and put back at once, so no other dataset of this process sees it.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            paths,
            filesystem=filesystem,
            columns=columns,
            include_paths=include_paths,
            override_num_blocks=tasks or len(paths),
        )
    finally:
        context.use_datasource_v2 = before


def count_buckets(fs: pafs.FileSystem, shards: list[str]) -> dict[str, int]:
    """Rows per bucket label over ``shards`` (reads only the two bucket columns)."""
    import pyarrow.parquet as pq

    counts: Counter[str] = Counter()
    for shard in shards:
        with fs.open_input_file(shard) as f:
            table = pq.read_table(f, columns=[cache.BUCKET_H, cache.BUCKET_W])
        pairs = zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
        counts.update(buckets.label(pair) for pair in pairs)
    return dict(sorted(counts.items()))
