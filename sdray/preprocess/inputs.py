"""Input discovery through pyarrow file systems: files, directories, globs, local or object-store URIs.

Each input parquet file is one *unit*: the grain of resume (the manifest records finished files) and of
output shards (a shard never mixes input files).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdray import storage
from sdray.errors import InputError
from sdray.preprocess.config import PreprocessConfig


@dataclass(frozen=True)
class InputFile:
    """One input parquet file (a unit of work)."""

    path: str
    """Path inside ``filesystem`` (no scheme), as Ray Data's ``include_paths`` reports it."""
    size: int
    """Bytes, from the listing; with ``mtime_ns`` tells whether the file changed since it was preprocessed."""
    mtime_ns: int = 0
    """Modification time from the listing (object stores: last-modified); 0 if the file system has none."""

    @classmethod
    def from_info(cls, info: pafs.FileInfo) -> InputFile:
        return cls(info.path, info.size, info.mtime_ns or 0)

    @property
    def key(self) -> str:
        return unit_key(self.path)


def unit_key(path: str) -> str:
    """16 hex characters naming an input file's shards, reject log and manifest record."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def _expand(fs: pafs.FileSystem, path: str, where: str) -> list[InputFile]:
    try:
        found = storage.parquet_files(fs, path)
    except FileNotFoundError:
        raise InputError(f"input {where!r} does not exist") from None
    if not found:
        raise InputError(f"input {where!r} matches no .parquet files")
    return [InputFile.from_info(i) for i in found]


def resolve_inputs(spec: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Expand a comma-separated list of files/dirs/globs (one file system) into sorted unique parquet files."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError("no input given (preprocess.input / --input)")
    systems = [storage.resolve(item) for item in items]
    fs = systems[0][0]
    if any(type(f) is not type(fs) for f, _ in systems):
        raise InputError(f"inputs {items} mix file systems; give one kind of location per run")
    files = {
        f.path: f for (_, path), item in zip(systems, items, strict=True) for f in _expand(fs, path, item)
    }
    return fs, sorted(files.values(), key=lambda f: f.path)


def _check_schema(schema: pa.Schema, cfg: PreprocessConfig, path: str) -> None:
    checks = {
        cfg.id_column: (
            "id",
            lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
        ),
        cfg.image_column: ("image", _is_image_type),
        cfg.caption_column: ("caption", _is_caption_type),
    }
    for column, (role, ok) in checks.items():
        index = schema.get_field_index(column)
        if index < 0:
            raise InputError(
                f"{path}: no {role} column {column!r} (columns: {', '.join(schema.names)}); "
                f"set preprocess.{role}_column"
            )
        if not ok(schema.field(index).type):
            raise InputError(
                f"{path}: {role} column {column!r} has unsupported type {schema.field(index).type}"
            )


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        index = t.get_field_index("bytes")
        return index >= 0 and _is_binary(t.field(index).type)
    return _is_binary(t)


def _is_caption_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def row_counts(fs: pafs.FileSystem, files: list[InputFile], cfg: PreprocessConfig) -> dict[str, int]:
    """Rows per file from the parquet footers (read in parallel); checks the configured columns exist."""

    def footer(file: InputFile) -> pq.FileMetaData:
        try:
            with fs.open_input_file(file.path) as f:
                meta = pq.ParquetFile(f).metadata
                _check_schema(meta.schema.to_arrow_schema(), cfg, file.path)
                return meta
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{file.path}: not a readable parquet file: {exc}") from exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = dict(zip((f.path for f in files), pool.map(footer, files), strict=True))
    _check_same_types(footers, cfg)
    return {path: meta.num_rows for path, meta in footers.items()}


def _check_same_types(footers: dict[str, pq.FileMetaData], cfg: PreprocessConfig) -> None:
    """Ray Data reads all files as one data set: the used columns must have one type across files."""
    columns = (cfg.id_column, cfg.image_column, cfg.caption_column)
    first_path, first = None, None
    for path, meta in footers.items():
        schema = meta.schema.to_arrow_schema()
        types = [schema.field(c).type for c in columns]
        if first is None:
            first_path, first = path, types
            continue
        for column, a, b in zip(columns, first, types, strict=True):
            if a != b:
                raise InputError(
                    f"column {column!r} is {a} in {first_path} but {b} in {path}; "
                    "one run needs one schema: preprocess these files separately"
                )


def read_ids(fs: pafs.FileSystem, files: list[InputFile], cfg: PreprocessConfig) -> dict[str, list[str]]:
    """Input path -> its row ids as strings (as the cache stores them; missing ids left out), read in parallel."""

    def ids(file: InputFile) -> list[str]:
        with fs.open_input_file(file.path) as f:
            values = pq.read_table(f, columns=[cfg.id_column]).column(cfg.id_column).to_pylist()
        return [str(v) for v in values if v is not None]

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip((f.path for f in files), pool.map(ids, files), strict=True))
