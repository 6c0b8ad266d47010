"""The output directory as the writer sees it: sidecars, atomic shard writes, and the resume manifest.

The layout is the cache contract in :mod:`sdray.data.cache` (shards ``part-<unit>-<hash>.parquet``,
``_manifest/<unit>.json``, ``_rejects/<unit>.jsonl``, ``_summary.json``, ``_config.yaml``).

Resume rule: a unit with a manifest record is done and skipped; any other unit's shards and reject log are
deleted before it is processed again, so a killed run never leaves duplicates; a shard of a finished unit
that its record does not list (an orphan) is deleted too. Writes go through :mod:`sdray.storage` (atomic).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdray import storage
from sdray.data.cache import (
    ID,
    INFO_FILE,
    MANIFEST_DIR,
    REJECTS_DIR,
    CacheInfo,
    UnitRecord,
    read_manifest,
    shard_unit,
    sidecar_files,
)
from sdray.data.rejects import reject_log_lines
from sdray.errors import ConfigError, InputError
from sdray.preprocess.inputs import InputFile

log = logging.getLogger(__name__)

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


class OutputDir(storage.Location):
    """A cache directory on any pyarrow file system; picklable, so write tasks receive it."""

    def __init__(self, uri: str) -> None:
        if not uri:
            raise InputError("no output given (preprocess.output / --output)")
        super().__init__(uri)

    def write_shard(self, name: str, table: pa.Table) -> int:
        """One parquet shard, written whole and atomically; returns bytes written."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_bytes(name, sink.getvalue().to_pybytes())

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
                self.write_bytes(name, data)
            return False
        old = CacheInfo.from_json(text, where=self.path(INFO_FILE))
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
        return read_manifest(self)

    def pending(self, files: list[InputFile], done: dict[str, UnitRecord]) -> list[InputFile]:
        """The input files without a manifest record.

        Raises:
            InputError: a finished file changed since (size or mtime): its rows in the output are stale.
        """
        for f in files:
            record = done.get(f.key)
            if record is None:
                continue
            if record.size != f.size or (record.mtime_ns and f.mtime_ns and record.mtime_ns != f.mtime_ns):
                raise InputError(
                    f"{f.path} changed since it was processed into {self.uri} (size {record.size} -> "
                    f"{f.size} bytes, mtime_ns {record.mtime_ns} -> {f.mtime_ns}); write to a new output "
                    "directory"
                )
        return [f for f in files if f.key not in done]

    def resume(self, files: list[InputFile], what: str) -> tuple[dict[str, UnitRecord], list[InputFile]]:
        """Start or resume a run over ``files``: (records of the finished ones, the ones to do), after
        deleting what an interrupted run left behind; logs the plan (``what``: "input", "prompt")."""
        done = self.done()
        pending = self.pending(files, done)
        cleaned = self.clean({f.key for f in pending}, done)
        log.info(
            "%s: %d %s file(s), %d already done, %d to do%s",
            self.uri, len(files), what, len(files) - len(pending), len(pending),
            f" (removed {cleaned} leftover file(s) of an interrupted run)" if cleaned else "",
        )  # fmt: skip
        return done, pending

    def clean(self, pending_keys: set[str], done: dict[str, UnitRecord]) -> int:
        """Delete leftovers of interrupted runs; returns files deleted.

        Those are: shards and reject logs of unfinished units (``pending_keys``), shards of finished units
        that their record does not list (``done``), and stale temp files.
        """
        listed = {name for record in done.values() for name in record.shards}
        doomed = []
        for info in self.files():
            name = info.base_name
            stale_tmp = name.startswith(".") and ".tmp-" in name
            unit = shard_unit(name)
            orphan = unit in done and name not in listed
            rejects = (
                info.path.endswith(f"{REJECTS_DIR}/{name}") and name.removesuffix(".jsonl") in pending_keys
            )
            if stale_tmp or unit in pending_keys or orphan or rejects:
                doomed.append(info.path)
        self.delete(doomed)
        return len(doomed)

    def commit(self, key: str, record: UnitRecord, rejected_rows: list[dict[str, str]]) -> None:
        """Record a finished unit: its reject log first, then the manifest record (the commit point)."""
        if rejected_rows:
            self.write_bytes(f"{REJECTS_DIR}/{key}.jsonl", reject_log_lines(rejected_rows))
        self.write_bytes(f"{MANIFEST_DIR}/{key}.json", json.dumps(asdict(record), indent=1).encode())

    def written_ids(self, done: dict[str, UnitRecord]) -> dict[str, str]:
        """Row id -> input file, over the shards of the finished units (reads only the id column)."""
        owners = {}
        for record in done.values():
            for name in record.shards:
                with self.fs.open_input_file(self.path(name)) as f:
                    ids = pq.read_table(f, columns=[ID]).column(ID).to_pylist()
                owners.update(dict.fromkeys(ids, record.input))
        return owners

    def read_rejects(self) -> list[dict[str, str]]:
        """Every reject record of the cache (all units)."""
        rows = []
        for info in self.files(REJECTS_DIR, recursive=False):
            if info.base_name.endswith(".jsonl"):
                text = self.read_bytes(f"{REJECTS_DIR}/{info.base_name}").decode()
                rows += [json.loads(line) for line in text.splitlines() if line]
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
        "long_captions": sum(r.long_captions for r in records.values()),
        **bucket_rows,
    }
