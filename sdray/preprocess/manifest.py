"""The output directory as the writer sees it: sidecars, atomic shard writes, and the resume manifest.

Layout (besides the contract in :mod:`sdray.data.cache`)::

    part-<unit>-<hash>.parquet     shards of one input file (<unit> = InputFile.key)
    _manifest/<unit>.json          written last, when every row of that input file is in a shard or rejected
    _rejects/<unit>.jsonl          rejected rows of that input file (only if any)
    _summary.json, _config.yaml    totals over the manifest, and the resolved config of the last run

Resume rule: a unit with a manifest record is done and skipped; any other unit's shards and reject log are
deleted before it is processed again, so a killed run never leaves duplicates. Local writes go to a hidden
temp name and are renamed; object-store writes are atomic per object already.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdray.data.cache import INFO_FILE, CacheInfo, sidecar_files
from sdray.errors import ConfigError, InputError
from sdray.preprocess.inputs import filesystem_for
from sdray.preprocess.rejects import reject_log_lines

MANIFEST_DIR = "_manifest"
REJECTS_DIR = "_rejects"
SUMMARY_FILE = "_summary.json"
CONFIG_FILE = "_config.yaml"
SHARD_PREFIX = "part-"
# CacheInfo fields that must match to add rows to an existing cache (model_source is informational).
_MUST_MATCH = (
    "encoder_fingerprint",
    "resolution",
    "latent_shape",
    "text_embeds_shape",
    "has_std",
    "vae_scaling_factor",
    "buckets",
)


@dataclass
class UnitRecord:
    """The manifest record of one finished input file."""

    input: str
    size: int
    rows: int
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    """Rows written per aspect-ratio bucket ("HxW"); empty for a square cache."""

    @property
    def accounted(self) -> int:
        return self.written + sum(self.rejected.values())


class OutputDir:
    """A cache directory on any pyarrow file system; picklable, so write tasks receive it."""

    def __init__(self, uri: str) -> None:
        if not uri:
            raise InputError("no output given (preprocess.output / --output)")
        self.uri = uri
        self.fs, self.root = filesystem_for(uri)

    def _path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def put(self, name: str, data: bytes) -> int:
        """Write ``data`` to ``name`` (relative, may contain one folder) atomically; returns its size."""
        target = self._path(name)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return len(data)
        folder, base = target.rsplit("/", 1)
        tmp = f"{folder}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, target)
        return len(data)

    def read_text(self, name: str) -> str | None:
        target = self._path(name)
        if self.fs.get_file_info(target).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(target) as f:
            return f.read().decode()

    def write_shard(self, name: str, table: pa.Table) -> int:
        """One parquet shard, written whole and atomically; returns bytes written."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.put(name, sink.getvalue().to_pybytes())

    def prepare(self, info: CacheInfo, empty_caption_embeds: np.ndarray) -> bool:
        """Create the cache sidecars, or check an existing cache was made by the same encoders/resolution.

        Returns:
            True if the cache already existed.

        Raises:
            ConfigError: the existing cache was made with another model, resolution or std setting.
        """
        text = self.read_text(INFO_FILE)
        if text is None:
            for name, data in sidecar_files(info, empty_caption_embeds).items():
                self.put(name, data)
            return False
        old = CacheInfo.from_json(text, where=self._path(INFO_FILE))
        diffs = [f"{k}: cache has {getattr(old, k)!r}, now {getattr(info, k)!r}" for k in _MUST_MATCH
                 if getattr(old, k) != getattr(info, k)]  # fmt: skip
        if diffs:
            raise ConfigError(
                f"output {self.uri} holds a cache made with a different model or settings ("
                + "; ".join(diffs)
                + "); write to a new output directory, or delete this one to rebuild it"
            )
        return True

    def done(self) -> dict[str, UnitRecord]:
        """Manifest records of finished units, keyed by unit key."""
        selector = pafs.FileSelector(self._path(MANIFEST_DIR), allow_not_found=True)
        names = [i.path.rsplit("/", 1)[-1] for i in self.fs.get_file_info(selector) if i.is_file]
        names = [n for n in names if n.endswith(".json") and not n.startswith(".")]
        with ThreadPoolExecutor(max_workers=16) as pool:
            texts = list(pool.map(lambda n: self.read_text(f"{MANIFEST_DIR}/{n}"), names))
        return {
            n.removesuffix(".json"): UnitRecord(**json.loads(t)) for n, t in zip(names, texts, strict=True)
        }

    def clean(self, pending_keys: set[str]) -> int:
        """Delete shards and reject logs of unfinished units and stale temp files; returns files deleted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        doomed = []
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            stale_tmp = name.startswith(".") and ".tmp-" in name
            unit = name[len(SHARD_PREFIX) :].split("-", 1)[0] if name.startswith(SHARD_PREFIX) else None
            rejects = (
                info.path.endswith(f"{REJECTS_DIR}/{name}") and name.removesuffix(".jsonl") in pending_keys
            )
            if info.is_file and (stale_tmp or unit in pending_keys or rejects):
                doomed.append(info.path)
        for path in doomed:
            self.fs.delete_file(path)
        return len(doomed)

    def commit(self, key: str, record: UnitRecord, rejected_rows: list[dict[str, str]]) -> None:
        """Record a finished unit: its reject log first, then the manifest record (the commit point)."""
        if rejected_rows:
            self.put(f"{REJECTS_DIR}/{key}.jsonl", reject_log_lines(rejected_rows))
        self.put(f"{MANIFEST_DIR}/{key}.json", json.dumps(asdict(record), indent=1).encode())

    def read_rejects(self) -> list[dict[str, str]]:
        """Every reject record of the cache (all units)."""
        selector = pafs.FileSelector(self._path(REJECTS_DIR), allow_not_found=True)
        rows = []
        for info in sorted(self.fs.get_file_info(selector), key=lambda i: i.path):
            if info.is_file and info.path.endswith(".jsonl"):
                with self.fs.open_input_stream(info.path) as f:
                    rows += [json.loads(line) for line in f.read().decode().splitlines() if line]
        return rows


def totals(records: dict[str, UnitRecord]) -> dict[str, object]:
    """Rows in / written / rejected by reason over manifest records; in == written + rejected."""
    rejected: Counter[str] = Counter()
    per_bucket: Counter[str] = Counter()
    for record in records.values():
        rejected.update(record.rejected)
        per_bucket.update(record.buckets)
    bucket_rows = {"buckets": dict(sorted(per_bucket.items()))} if per_bucket else {}
    return {
        "input_files": len(records),
        "rows_in": sum(r.rows for r in records.values()),
        "rows_written": sum(r.written for r in records.values()),
        "rows_rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "shards": sum(len(r.shards) for r in records.values()),
        "bytes_written": sum(r.bytes_written for r in records.values()),
        **bucket_rows,
    }
