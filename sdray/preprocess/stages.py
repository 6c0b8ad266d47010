"""The two stateless batch functions of the pipeline: the CPU decode stage and the shard writer.

Batches between stages are dicts of numpy arrays with these columns (N rows):
    id, caption, unit, reason, detail   object (str); reason "" means the row is still good
    pixels      uint8 (N, 3, R, R)      decode -> encode only (bucketed: (N, 3*R*R), see preprocess.bucketing)
    input_ids   int64 (N, 77)           decode -> encode only
    latent      float16 (N, C, h, w)    encode -> write (zeros on rejected rows); latent_std likewise
    text_embeds float16 (N, 77, D)      encode -> write
    decode_s, encode_s  float64 (N,)    seconds spent on the row's batch in that stage, divided per row
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from sdray.data import cache, rejects
from sdray.data.images import open_checked, pick_caption
from sdray.data.rejects import Rejected
from sdray.preprocess.bucketing import bucket_tables, pixel_layout
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.inputs import unit_key
from sdray.preprocess.manifest import OutputDir

UNIT = "path"  # the column Ray Data's read_parquet(include_paths=True) adds: the input file of each row
EVENT_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("kind", pa.string()),  # "shard" (rows = rows written, name = shard file) or "reject" (name = row id)
        ("name", pa.string()),
        ("rows", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("bytes", pa.int64()),
        ("decode_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("write_s", pa.float64()),
        ("long_captions", pa.int64()),  # written rows whose caption was truncated to the tokenizer's window
    ]
)


@lru_cache(maxsize=2)
def _tokenizer(model_json: str) -> Any:
    """The model's tokenizer, loaded once per worker process (Ray reuses workers across tasks)."""
    import json

    from sdray.config import from_dict
    from sdray.models.config import ModelConfig
    from sdray.models.tokenizer import load_tokenizer

    return load_tokenizer(from_dict(ModelConfig, json.loads(model_json), where="model"))


def _image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        return [None if v is None else v.get("bytes") for v in column.to_pylist()]
    return column.to_pylist()


def decode_batch(table: pa.Table, *, cfg: dict[str, Any], model_json: str) -> dict[str, np.ndarray]:
    """CPU stage: pick the caption, decode + check + crop the image, tokenize. Bad rows get a reason.

    Args:
        table: rows read from the input parquet (id, image, caption columns as configured, plus `path`).
        cfg: ``to_dict(PreprocessConfig)``.
        model_json: the model config as JSON (selects the tokenizer).
    """
    start = time.perf_counter()
    pre = PreprocessConfig(**cfg)
    n = table.num_rows
    ids = [None if v is None else str(v) for v in table.column(pre.id_column).to_pylist()]
    raw_captions = table.column(pre.caption_column).to_pylist()
    images = _image_bytes(table.column(pre.image_column))
    layout = pixel_layout(pre, n)  # square crop, or aspect-ratio buckets (sdray.preprocess.bucketing)
    captions, reasons, details = [""] * n, [""] * n, [""] * n
    for i in range(n):
        try:
            if ids[i] is None:
                raise Rejected(rejects.MISSING_ID)
            captions[i] = pick_caption(raw_captions[i], pre.caption_strategy, ids[i])
            image = open_checked(images[i], min_side=pre.min_image_side, max_pixels=pre.max_image_pixels)
            layout.put(i, image)
        except Rejected as exc:
            reasons[i], details[i] = exc.reason, exc.detail
    tokenizer = _tokenizer(model_json)
    input_ids = np.zeros((n, tokenizer.model_max_length), np.int64)
    good = [i for i in range(n) if not reasons[i]]
    long_caption = np.zeros(n, bool)
    if good:
        texts = [captions[i] for i in good]
        input_ids[good] = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        lengths = [len(t) for t in tokenizer(texts, verbose=False).input_ids]  # untruncated, with BOS/EOS
        long_caption[good] = np.array(lengths) > tokenizer.model_max_length
    return {
        "id": np.array(ids, dtype=object),
        "caption": np.array(captions, dtype=object),
        "unit": np.array(table.column(UNIT).to_pylist(), dtype=object),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
        **layout.columns(),
        "input_ids": input_ids,
        "long_caption": long_caption,
        "decode_s": np.full(n, (time.perf_counter() - start) / max(n, 1)),
    }


def _shard_name(unit: str, ids: list[str], bucket: str = "") -> str:
    """Named by the unit (and bucket) and the rows it holds, so a retried task overwrites instead of duplicating."""
    digest = hashlib.sha1("\0".join(ids).encode()).hexdigest()[:16]
    return f"{cache.SHARD_PREFIX}{unit_key(unit)}-{bucket + '-' if bucket else ''}{digest}.parquet"


def _write_good(
    batch: dict[str, np.ndarray], good: list[int], unit: str, out: OutputDir, info: cache.CacheInfo
) -> list[tuple[str, int, int, str]]:
    """Write the good rows of one unit: one shard, or one per bucket. Returns (name, rows, bytes, bucket)."""
    if info.buckets:
        written = []
        for bucket, table in bucket_tables(batch, good, info):
            name = _shard_name(unit, table.column(cache.ID).to_pylist(), bucket)
            written.append((name, table.num_rows, out.write_shard(name, table), bucket))
        return written
    ids = [batch["id"][i] for i in good]
    table = cache.to_table(
        info,
        ids=ids,
        latents=batch["latent"][good],
        latent_std=batch["latent_std"][good] if info.has_std else None,
        text_embeds=batch["text_embeds"][good],
        captions=[batch["caption"][i] for i in good],
    )
    name = _shard_name(unit, ids)
    return [(name, len(good), out.write_shard(name, table), "")]


def write_shards(
    batch: dict[str, np.ndarray], *, out: OutputDir, info_json: str, rows_per_shard: int
) -> pa.Table:
    """Write stage: the good rows of each input file in the block as shards of at most ``rows_per_shard``
    rows (one per bucket when bucketed); return events for the driver's ledger."""
    info = cache.CacheInfo.from_json(info_json, where="cache info")
    events: list[dict[str, Any]] = []
    for unit in sorted(set(batch["unit"].tolist())):
        start = time.perf_counter()
        rows = np.flatnonzero(batch["unit"] == unit)
        good = [int(i) for i in rows if not batch["reason"][i]]
        chunks = [good[i : i + rows_per_shard] for i in range(0, len(good), rows_per_shard)]
        shards = [s for chunk in chunks for s in _write_good(batch, chunk, unit, out, info)]
        shards = shards or [("", 0, 0, "")]  # all rejected: one event carries the file's timing
        for i in rows:
            if batch["reason"][i]:
                events.append(
                    _event(unit, "reject", batch["id"][i], 0, batch["reason"][i], batch["detail"][i])
                )
        timing = {
            "decode_s": float(batch["decode_s"][rows].sum()),
            "encode_s": float(batch["encode_s"][rows].sum()),
            "write_s": time.perf_counter() - start,
            "long_captions": int(batch["long_caption"][good].sum()) if good else 0,
        }
        for k, (name, count, size, bucket) in enumerate(shards):  # detail: the bucket ("HxW") or ""
            events.append(
                _event(unit, "shard", name, count, "", bucket, bytes=size, **(timing if k == 0 else {}))
            )
    return pa.Table.from_pylist(events, schema=EVENT_SCHEMA)


def _event(
    unit: str, kind: str, name: str, rows: int, reason: str = "", detail: str = "", **extra: Any
) -> dict:
    base = {"bytes": 0, "decode_s": 0.0, "encode_s": 0.0, "write_s": 0.0, "long_captions": 0}
    return {
        "unit": unit,
        "kind": kind,
        "name": name,
        "rows": rows,
        "reason": reason,
        "detail": detail,
        **base,
        **extra,
    }
