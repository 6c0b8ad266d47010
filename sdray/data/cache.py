"""The latent cache contract: column names, dtypes, shapes, metadata, format version. Writer and reader both
import this module; nothing else spells a column name.

A cache is a directory of parquet shards plus sidecar files whose names start with `_` (parquet readers,
pyarrow's and Ray's, skip those):

    part-*.parquet          one row per accepted image
    _cache.json             CacheInfo (also stored in every shard's schema metadata under b"sdray")
    _empty_caption.safetensors   the text embedding of "" (caption dropout / classifier-free guidance)

and, when written by `sdray preprocess` (see :mod:`sdray.preprocess.manifest` for the resume rule):

    part-<unit>-<hash>.parquet   shards of one input file (<unit>: 16 hex characters naming the file)
    _manifest/<unit>.json   UnitRecord, written last, when every row of that input file is in a shard or rejected
    _rejects/<unit>.jsonl   rejected rows of that input file (only if any)
    _summary.json, _config.yaml  totals over the manifest, and the resolved config of the last run

Columns (plain pyarrow types; tensors are flattened row-major, shapes come from CacheInfo):
    id            string
    latent        fixed_size_list<halffloat>[C*h*w]   unscaled VAE posterior mean, shape CacheInfo.latent_shape
    latent_std    fixed_size_list<halffloat>[C*h*w]   posterior std (only when CacheInfo.has_std)
    text_embeds   fixed_size_list<halffloat>[77*D]    last hidden state of the text encoder, CacheInfo.text_embeds_shape
    caption       string                              the caption that was encoded

Reading without Ray: `pq.read_table(d).column("latent").combine_chunks().flatten().to_numpy()
.reshape(-1, *info.latent_shape)`.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdray import storage
from sdray.errors import InputError

FORMAT_VERSION = 1
ID, LATENT, LATENT_STD, TEXT_EMBEDS, CAPTION = "id", "latent", "latent_std", "text_embeds", "caption"
INFO_FILE = "_cache.json"
EMPTY_CAPTION_FILE = "_empty_caption.safetensors"
EMPTY_CAPTION_KEY = "text_embeds"
METADATA_KEY = b"sdray"
SHARD_PREFIX = "part-"
MANIFEST_DIR = "_manifest"
REJECTS_DIR = "_rejects"
SUMMARY_FILE = "_summary.json"
CONFIG_FILE = "_config.yaml"


@dataclass(kw_only=True, frozen=True)
class CacheInfo:
    """File-level metadata of a latent cache."""

    format_version: int = FORMAT_VERSION
    vae_scaling_factor: float
    """Multiply stored latents by this before the UNet sees them (once, in training)."""
    encoder_fingerprint: str
    """sdray.models.fingerprint.encoder_fingerprint of the VAE + text encoder that made the cache."""
    resolution: int
    """Side of the square images that were encoded, pixels."""
    latent_shape: tuple[int, int, int]
    """(C, h, w) of one latent."""
    text_embeds_shape: tuple[int, int]
    """(tokens, D) of one text embedding."""
    has_std: bool = False
    """Whether `latent_std` is stored, so training can sample the posterior."""
    model_source: str = ""
    """Where the encoders came from (path or preset), for humans."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> CacheInfo:
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise InputError(
                    f"{where}: cache format version {data.get('format_version')}, "
                    f"this sdray reads version {FORMAT_VERSION}; re-run `sdray preprocess`"
                )
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where}: unreadable cache metadata: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict) -> CacheInfo:
        """From ``asdict(info)`` (JSON or YAML turned the shapes into lists); raises KeyError/TypeError/ValueError."""
        shapes = {key: tuple(data[key]) for key in ("latent_shape", "text_embeds_shape")}
        return cls(**{**data, **shapes})


def _tensor_type(shape: tuple[int, ...]) -> pa.DataType:
    return pa.list_(pa.float16(), math.prod(shape))


def cache_schema(info: CacheInfo) -> pa.Schema:
    """The arrow schema of every shard, with CacheInfo in its metadata."""
    fields = [pa.field(ID, pa.string()), pa.field(LATENT, _tensor_type(info.latent_shape))]
    if info.has_std:
        fields.append(pa.field(LATENT_STD, _tensor_type(info.latent_shape)))
    fields += [pa.field(TEXT_EMBEDS, _tensor_type(info.text_embeds_shape)), pa.field(CAPTION, pa.string())]
    return pa.schema(fields, metadata={METADATA_KEY: info.to_json().encode()})


def _tensor_column(array: np.ndarray, shape: tuple[int, ...], name: str) -> pa.Array:
    if array.shape[1:] != shape:
        raise ValueError(f"{name}: expected rows of shape {shape}, got {array.shape[1:]}")
    flat = np.ascontiguousarray(array, dtype=np.float16).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), math.prod(shape))


def to_table(
    info: CacheInfo,
    *,
    ids: list[str],
    latents: np.ndarray,
    text_embeds: np.ndarray,
    captions: list[str],
    latent_std: np.ndarray | None = None,
) -> pa.Table:
    """Rows of a shard. ``latents``/``latent_std``: (N, C, h, w); ``text_embeds``: (N, 77, D); cast to fp16."""
    columns = {ID: pa.array(ids, pa.string()), LATENT: _tensor_column(latents, info.latent_shape, LATENT)}
    if info.has_std:
        if latent_std is None:
            raise ValueError("CacheInfo.has_std is set but latent_std is missing")
        columns[LATENT_STD] = _tensor_column(latent_std, info.latent_shape, LATENT_STD)
    columns[TEXT_EMBEDS] = _tensor_column(text_embeds, info.text_embeds_shape, TEXT_EMBEDS)
    columns[CAPTION] = pa.array(captions, pa.string())
    return pa.Table.from_pydict(columns, schema=cache_schema(info))


def tensor_columns(info: CacheInfo) -> dict[str, tuple[int, ...]]:
    """Column name -> per-row shape, for the columns that hold tensors."""
    shapes: dict[str, tuple[int, ...]] = {LATENT: info.latent_shape, TEXT_EMBEDS: info.text_embeds_shape}
    if info.has_std:
        shapes[LATENT_STD] = info.latent_shape
    return shapes


def unflatten(batch: dict[str, np.ndarray], info: CacheInfo) -> dict[str, np.ndarray]:
    """Reshape a batch read by Ray (``(B, prod(shape))`` arrays) or pyarrow into ``(B, *shape)`` arrays."""
    out = dict(batch)
    for name, shape in tensor_columns(info).items():
        if name in out:
            out[name] = np.asarray(out[name]).reshape(-1, *shape)
    return out


def sidecar_files(info: CacheInfo, empty_caption_embeds: np.ndarray) -> dict[str, bytes]:
    """File name -> bytes of the sidecars, in write order (for writers on any file system)."""
    from safetensors.numpy import save  # local: keep this module importable without safetensors' numpy glue

    if empty_caption_embeds.shape != info.text_embeds_shape:
        raise ValueError(f"empty caption embeds {empty_caption_embeds.shape} != {info.text_embeds_shape}")
    tensors = {EMPTY_CAPTION_KEY: np.ascontiguousarray(empty_caption_embeds, dtype=np.float16)}
    return {EMPTY_CAPTION_FILE: save(tensors), INFO_FILE: info.to_json().encode()}


def write_sidecars(uri: str, info: CacheInfo, empty_caption_embeds: np.ndarray) -> None:
    """Write `_cache.json` and `_empty_caption.safetensors` (``empty_caption_embeds``: (77, D)) atomically."""
    for name, data in sidecar_files(info, empty_caption_embeds).items():
        storage.write_bytes(storage.join(str(uri), name), data)


def read_cache_info(uri: str | Path) -> CacheInfo:
    """CacheInfo of the cache directory ``uri`` (local or s3://), from its `_cache.json`.

    Raises:
        InputError: naming the directory if it does not exist, is not a cache, or has unreadable metadata.
    """
    uri = str(uri)
    if not storage.exists(uri):
        raise InputError(f"latent cache {uri} does not exist; write one with `sdray preprocess`")
    info_uri = storage.join(uri, INFO_FILE)
    if not storage.exists(info_uri):
        raise InputError(f"{uri}: not a latent cache (no {INFO_FILE}); write one with `sdray preprocess`")
    return CacheInfo.from_json(storage.read_bytes(info_uri).decode(), where=info_uri)


def read_empty_caption(uri: str | Path, info: CacheInfo | None = None) -> np.ndarray:
    """The (77, D) float16 embedding of the empty caption stored in the cache ``uri``.

    Its shape is checked against ``info`` (read from the cache when not given).
    """
    from safetensors.numpy import load

    uri = str(uri)
    info = info or read_cache_info(uri)
    file = storage.join(uri, EMPTY_CAPTION_FILE)
    if not storage.exists(file):
        raise InputError(f"{uri}: missing {EMPTY_CAPTION_FILE} (needed for caption dropout)")
    embeds = load(storage.read_bytes(file))[EMPTY_CAPTION_KEY]
    if tuple(embeds.shape) != tuple(info.text_embeds_shape):
        raise InputError(f"{file}: shape {embeds.shape}, expected {info.text_embeds_shape}")
    return embeds


def shard_unit(name: str) -> str | None:
    """The unit key in a shard file name ``part-<unit>-<hash>.parquet`` (None for other files)."""
    return name[len(SHARD_PREFIX) :].split("-", 1)[0] if name.startswith(SHARD_PREFIX) else None


@dataclass
class UnitRecord:
    """The manifest record of one finished input file (`_manifest/<unit>.json`)."""

    input: str
    size: int
    rows: int
    mtime_ns: int = 0
    """Modification time of the input file (object stores: last-modified), 0 where none is reported."""
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0
    long_captions: int = 0
    """Captions longer than the tokenizer's window (77 tokens), truncated when encoded."""

    @property
    def accounted(self) -> int:
        return self.written + sum(self.rejected.values())


def read_manifest(cache_dir: storage.Location) -> dict[str, UnitRecord]:
    """Manifest records of the finished input files of a cache, keyed by unit key."""
    names = [i.base_name for i in cache_dir.files(MANIFEST_DIR, recursive=False)]
    names = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(lambda n: cache_dir.read_bytes(f"{MANIFEST_DIR}/{n}"), names))
    return {n.removesuffix(".json"): UnitRecord(**json.loads(t)) for n, t in zip(names, texts, strict=True)}


def read_shard_info(shard: str | Path) -> CacheInfo:
    """CacheInfo stored in one shard's schema metadata."""
    metadata = pq.read_schema(shard).metadata or {}
    if METADATA_KEY not in metadata:
        raise InputError(f"{shard}: parquet file has no sdray cache metadata")
    return CacheInfo.from_json(metadata[METADATA_KEY].decode(), where=str(shard))
