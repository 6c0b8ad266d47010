"""`run_preprocess`: the one library call behind `sdray preprocess`.

1. resolve the inputs (files, dirs, globs; local or object store) and open the output directory
2. load the encoders in the driver: fingerprint, CacheInfo, the empty-caption embedding
3. create the cache sidecars, or refuse an existing cache made with another model or resolution
4. skip input files the manifest marks done; delete leftovers of the others (a killed run)
5. stream the rest through Ray Data (decode -> encode -> write shards) and commit each input file to the
   manifest as soon as all its rows are written or rejected
6. write and return the summary: rows in, written, rejected by reason (they add up), and this run's speed
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from sdray.cluster import ensure_ray
from sdray.config import dump_yaml
from sdray.data.buckets import bucket_ladder, size_multiple
from sdray.data.cache import CONFIG_FILE, INFO_FILE, SUMMARY_FILE, CacheInfo, UnitRecord
from sdray.errors import ConfigError, InputError
from sdray.models.config import ModelConfig
from sdray.pipeline_config import PipelineConfig
from sdray.preprocess.bucketing import unet_down_blocks
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.inputs import InputFile, read_ids, resolve_inputs, row_counts
from sdray.preprocess.manifest import OutputDir, totals
from sdray.progress import Progress

if TYPE_CHECKING:  # the encoders' modules import diffusers (seconds): a bad input fails before they load
    from sdray.models.components import SDComponents

log = logging.getLogger(__name__)


def cache_info(components: SDComponents, cfg: PipelineConfig) -> CacheInfo:
    """The metadata of the cache these encoders write at the configured resolution."""
    from sdray.models.fingerprint import encoder_fingerprint

    pre, down = cfg.preprocess, components.vae_downsample
    if pre.resolution % down:
        raise ConfigError(f"preprocess.resolution {pre.resolution} is not a multiple of the VAE's {down}x")
    return CacheInfo(
        buckets=model_ladder(components, pre, cfg.model),
        vae_scaling_factor=components.vae_scaling_factor,
        encoder_fingerprint=encoder_fingerprint(components),
        resolution=pre.resolution,
        latent_shape=(
            int(components.vae.config.latent_channels),
            pre.resolution // down,
            pre.resolution // down,
        ),
        text_embeds_shape=(int(components.tokenizer.model_max_length), components.text_embed_dim),
        has_std=pre.store_std,
        model_source=cfg.model.source,
    )


def model_ladder(
    components: SDComponents, pre: PreprocessConfig, model_cfg: ModelConfig
) -> tuple[tuple[int, int], ...]:
    """The bucket ladder (empty without `preprocess.buckets`); refuses a step the UNet cannot take."""
    if not pre.buckets:
        return ()
    down_blocks = unet_down_blocks(model_cfg)
    multiple = size_multiple(components.vae_downsample, down_blocks)
    if pre.bucket_step % multiple:
        raise ConfigError(
            f"preprocess.bucket_step {pre.bucket_step} is not a multiple of {multiple} (VAE "
            f"{components.vae_downsample}x times the UNet's {down_blocks - 1} downsamplings): every bucket must "
            "map to whole UNet feature maps"
        )
    return bucket_ladder(pre.resolution, pre.bucket_step, pre.bucket_max_aspect)


def empty_caption_embeds(components: SDComponents) -> np.ndarray:
    """(77, D) float32: the text encoder's last hidden state for the empty caption."""
    import torch

    tok = components.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.inference_mode():
        return components.text_encoder(ids).last_hidden_state[0].float().numpy()


class Ledger:
    """Counts the write events per input file and commits a file once all its rows are accounted for."""

    def __init__(self, out: OutputDir, files: list[InputFile], counts: dict[str, int]) -> None:
        self.out = out
        self.keys = {f.path: f.key for f in files}
        self.records = {
            f.path: UnitRecord(input=f.path, size=f.size, mtime_ns=f.mtime_ns, rows=counts[f.path])
            for f in files
        }
        self.rejects: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.stage_s: Counter[str] = Counter()
        self.committed: list[UnitRecord] = []
        self.rows_done = self.rows_rejected = 0  # this run's progress
        for path in [p for p, r in self.records.items() if r.rows == 0]:
            self._commit(path)

    def add(self, events: pa.Table) -> None:
        """Apply one batch of events (see stages.EVENT_SCHEMA); commit the files it completes."""
        touched = set()
        for e in events.to_pylist():
            record = self.records.get(e["unit"])
            if record is None:
                raise RuntimeError(f"write event for unknown or finished input {e['unit']!r}")
            touched.add(e["unit"])
            self.rows_done += 1 if e["kind"] == "reject" else e["rows"]
            if e["kind"] == "reject":
                self.rows_rejected += 1
                record.rejected[e["reason"]] = record.rejected.get(e["reason"], 0) + 1
                self.rejects[e["unit"]].append(
                    {"id": e["name"], "reason": e["reason"], "detail": e["detail"], "input": e["unit"]}
                )
                continue
            if e["name"]:
                if e["name"] in record.shards:
                    raise RuntimeError(
                        f"shard {e['name']} reported twice for {e['unit']}: duplicate ids in it?"
                    )
                record.shards.append(e["name"])
            record.written += e["rows"]
            if e["detail"]:  # a bucketed shard: detail is its bucket
                record.buckets[e["detail"]] = record.buckets.get(e["detail"], 0) + e["rows"]
            record.bytes_written += e["bytes"]
            record.long_captions += e["long_captions"]
            self.stage_s.update({k: e[k] for k in ("decode_s", "encode_s", "write_s")})
        for path in touched:
            record = self.records[path]
            if record.accounted > record.rows:
                raise RuntimeError(f"{path}: {record.accounted} rows accounted for, file has {record.rows}")
            if record.accounted == record.rows:
                self._commit(path)

    def _commit(self, path: str) -> None:
        record = self.records.pop(path)
        record.shards.sort()
        self.out.commit(self.keys[path], record, self.rejects.pop(path, []))
        self.committed.append(record)
        log.debug("done %s: %d written, %d rejected", path, record.written, sum(record.rejected.values()))

    def finish(self) -> None:
        """After the stream ends every input file must be committed; else the run is incomplete (a bug)."""
        if self.records:
            missing = {p: f"{r.accounted}/{r.rows}" for p, r in list(self.records.items())[:5]}
            raise RuntimeError(f"{len(self.records)} input file(s) incomplete (rows accounted/in): {missing}")


def _check_unique_ids(
    out: OutputDir, fs: Any, pending: list[InputFile], done: dict, cfg: PipelineConfig
) -> None:
    """Row ids must be unique across the whole cache: within and across input files, old and new."""
    owners = out.written_ids(done) if pending else {}
    for path, ids in read_ids(fs, pending, cfg.preprocess).items():
        for row_id in ids:
            if row_id in owners:
                where = "twice in " + path if owners[row_id] == path else f"in {owners[row_id]} and {path}"
                raise InputError(f"duplicate id {row_id!r} {where}; ids must be unique across the inputs")
            owners[row_id] = path


def _process(  # noqa: PLR0913 - the run's state, kept explicit
    cfg: PipelineConfig,
    out: OutputDir,
    fs: Any,
    pending: list[InputFile],
    info: CacheInfo,
    rows: dict[str, int],
    label: str,
) -> Ledger:
    ledger = Ledger(out, pending, {f.path: rows[f.path] for f in pending})
    if ledger.records:
        paths = list(ledger.records)
        from sdray.preprocess.dataset import build_dataset

        ds = build_dataset(
            cfg, fs=fs, paths=paths, rows=[ledger.records[p].rows for p in paths], out=out, info=info
        )
        total = sum(record.rows for record in ledger.records.values())
        progress = Progress(total, label=label, unit="images")
        for events in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ledger.add(events)
            progress.update(ledger.rows_done, rejected=ledger.rows_rejected)
    ledger.finish()
    return ledger


def run_preprocess(cfg: PipelineConfig, *, label: str = "preprocess") -> dict[str, Any]:
    """Encode ``cfg.preprocess.input`` into the latent cache ``cfg.preprocess.output``; resumable. ``label``
    starts the progress lines (tells two runs of one process apart).

    Returns:
        The summary also written to `_summary.json`: totals over the whole cache and `this_run` stats.
    """
    pre = cfg.preprocess
    out = OutputDir(pre.output)
    fs, files = resolve_inputs(pre.input)
    # Columns and types of the files to do, from their footers: a typo fails here, before anything is
    # written to the output or Ray starts.
    rows = row_counts(fs, out.pending(files, out.done()), pre)
    start = time.perf_counter()
    from sdray.models.components import load_components

    components = load_components(cfg.model, parts=("tokenizer", "text_encoder", "vae"))
    info = cache_info(components, cfg)
    existed = out.prepare(info, empty_caption_embeds(components))
    del components
    load_s = time.perf_counter() - start
    out.write_bytes(CONFIG_FILE, dump_yaml(cfg).encode())
    done, pending = out.resume(files, "input")
    _check_unique_ids(out, fs, pending, done, cfg)
    if pending:
        ensure_ray()
    start = time.perf_counter()
    ledger = _process(cfg, out, fs, pending, info, rows, label) if pending else None
    wall = time.perf_counter() - start
    summary = {**totals(out.done()), "cache_existed": existed, "this_run": _run_stats(ledger, wall, load_s)}
    if info.buckets:  # _cache.json lists the rows per bucket of the complete cache
        counts = dataclasses.replace(info, bucket_counts=summary.get("buckets", {}))
        out.write_bytes(INFO_FILE, counts.to_json().encode())
    out.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return summary


def _run_stats(ledger: Ledger | None, wall: float, load_s: float) -> dict[str, Any]:
    records = ledger.committed if ledger else []
    rows = sum(r.rows for r in records)
    written = sum(r.written for r in records)
    return {
        "input_files": len(records),
        "rows_in": rows,
        "rows_written": written,
        "rows_rejected": rows - written,
        "bytes_written": sum(r.bytes_written for r in records),
        "model_load_s": round(load_s, 3),
        "wall_s": round(wall, 3),
        "images_per_s": round(rows / wall, 2) if rows and wall > 0 else 0.0,
        "stage_task_s": {k: round(v, 3) for k, v in sorted((ledger.stage_s if ledger else {}).items())},
    }
