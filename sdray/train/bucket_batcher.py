"""The bucket batcher: same-shape micro-batches from a bucketed cache, the same number on every DDP rank.

Ray Data cannot group rows into same-shape batches (an open feature request), so with a bucketed cache each
worker reads the cache's rows into memory (float16 numpy, grouped by bucket: the cache size per worker) and
draws its batches from an epoch plan that is a pure function of (seed, epoch, rows per bucket, batch size,
workers):

1. each bucket's rows are shuffled; its last partial batch is filled up with rows drawn again from the same
   bucket (`repeat`), so no bucket is dropped, not even one smaller than a batch (`buckets.json` in the run
   directory lists the buckets that repeat rows);
2. the batches of all buckets are shuffled together (a step's shape is random, not grouped by bucket);
3. the list is extended with its own first batches to a multiple of the worker count, and rank r takes
   batches r, r + W, r + 2W, ...: every rank runs the same number of micro-batches per epoch (unequal
   counts hang DDP's all-reduce); shapes may differ between ranks.

Resume: the position is TrainingState's (epoch, batches_in_epoch); the plan is recomputed from it, so a run
resumed with the same number of workers continues with exactly the batches it would have had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from sdray.data import buckets, cache
from sdray.errors import InputError
from sdray.train.config import TrainConfig

if TYPE_CHECKING:  # not at run time: the training driver stays free of diffusers (seconds per process)
    from sdray.train.state import StreamPosition, TrainingState

log = logging.getLogger(__name__)

SUMMARY_FILE = "buckets.json"
Plan = list[tuple[str, np.ndarray]]
"""(bucket label, row indices within the bucket) per micro-batch."""


def epoch_plan(
    counts: dict[str, int], batch_size: int, world: int, *, seed: int, epoch: int, stream: int = 0
) -> Plan:
    """Every rank's micro-batches of one epoch, in order (see the module docstring); identical on all ranks.
    ``stream`` > 0 draws another order from the same seed (DreamBooth's class rows)."""
    rng = np.random.default_rng([seed, epoch, 0xB0C, *([stream] if stream else [])])
    batches: Plan = []
    for name in sorted(counts):
        n = counts[name]
        if n == 0:
            continue
        order = rng.permutation(n)
        pad = -n % batch_size
        if pad:  # repeat rows of this bucket rather than drop them or mix shapes
            order = np.concatenate([order, rng.choice(n, pad, replace=pad > n)])
        batches += [(name, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    extra = -len(batches) % world
    return batches + [batches[i % len(batches)] for i in range(extra)]


def rank_plan(plan: Plan, rank: int, world: int) -> Plan:
    """The micro-batches of ``rank``: every world-th one, starting at ``rank`` (len(plan) // world of them)."""
    return plan[rank::world]


def plan_summary(counts: dict[str, int], batch_size: int, world: int) -> dict:
    """What an epoch does with each bucket: rows, batches, rows repeated to fill a batch; written to
    `buckets.json` so that no bucket is padded (or dropped) silently."""
    per_bucket = {}
    for name in sorted(counts):
        n = counts[name]
        repeated = -n % batch_size
        per_bucket[name] = {"rows": n, "batches": -(-n // batch_size), "repeated_rows": repeated}
    total = sum(b["batches"] for b in per_bucket.values())
    return {
        "policy": "repeat",
        "batch_size": batch_size,
        "workers": world,
        "buckets": per_bucket,
        "repeated": [name for name, b in per_bucket.items() if b["repeated_rows"]],
        "smaller_than_a_batch": [name for name, b in per_bucket.items() if 0 < b["rows"] < batch_size],
        "batches_per_epoch": total,
        "batches_added_for_equal_ranks": -total % world,
        "micro_batches_per_worker_per_epoch": -(-total // world),
    }


@dataclass
class BucketStore:
    """Every row of a cache, grouped by bucket: label -> column -> (N, ...) float16 array. A square cache is
    one bucket (its resolution): `train.loader: memory` draws its batches the same way."""

    rows: dict[str, dict[str, np.ndarray]]

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(cols[cache.LATENT]) for name, cols in self.rows.items()}

    @classmethod
    def load(cls, fs: pafs.FileSystem, shards: list[str], info: cache.CacheInfo) -> BucketStore:
        """Read ``shards``; a row whose latent does not fit its bucket (a stale cache) is an InputError."""
        parts: dict[str, list[dict[str, np.ndarray]]] = {}
        for shard in shards:
            with fs.open_input_file(shard) as f:
                table = pq.read_table(f)
            split = _shard_buckets(table, info, shard) if info.buckets else _square_shard(table, info)
            for name, columns in split.items():
                parts.setdefault(name, []).append(columns)
        rows = {
            name: {col: np.concatenate([p[col] for p in chunks]) for col in chunks[0]}
            for name, chunks in sorted(parts.items())
        }
        return cls(rows)

    def batch(self, name: str, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Rows ``index`` of bucket ``name``: ``latent`` (B, C, h, w), ``text_embeds`` (B, 77, D), float16."""
        return {col: torch.from_numpy(values[index]).to(device) for col, values in self.rows[name].items()}


def _square_shard(table, info: cache.CacheInfo) -> dict[str, dict[str, np.ndarray]]:
    """One shard of a square cache (fixed-size tensor columns) as the single bucket of its resolution."""
    columns = {
        col: table.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, *shape)
        for col, shape in cache.tensor_columns(info).items()
    }
    return {buckets.label((info.resolution, info.resolution)): columns}


def _shard_buckets(table, info: cache.CacheInfo, shard: str) -> dict[str, dict[str, np.ndarray]]:
    """One shard's tensor columns, split by bucket and reshaped to each bucket's (C, h, w)."""
    heights, widths = table.column(cache.BUCKET_H).to_numpy(), table.column(cache.BUCKET_W).to_numpy()
    lengths = pc.list_value_length(table.column(cache.LATENT)).to_numpy(zero_copy_only=False)
    out = {}
    for h, w in sorted(set(zip(heights.tolist(), widths.tolist(), strict=True))):
        shape = info.row_latent_shape(h, w)
        mask = (heights == h) & (widths == w)
        bad = np.flatnonzero(mask & (lengths != np.prod(shape)))
        if len(bad):
            row_id = table.column(cache.ID)[int(bad[0])].as_py()
            raise InputError(
                f"{shard}: row {row_id!r} has a latent of {lengths[bad[0]]} values, its bucket {h}x{w} needs "
                f"{shape} = {int(np.prod(shape))} (a stale cache?); re-run `sdray preprocess` into a new output"
            )
        sub = table.filter(mask)
        columns = {}
        for col in (cache.LATENT, cache.LATENT_STD) if info.has_std else (cache.LATENT,):
            flat = sub.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            columns[col] = flat.reshape(sub.num_rows, *shape)
        text = sub.column(cache.TEXT_EMBEDS).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        columns[cache.TEXT_EMBEDS] = text.reshape(sub.num_rows, *info.text_embeds_shape)
        out[buckets.label((h, w))] = columns
    return out


def bucket_micro_batches(
    store: BucketStore,
    cfg: TrainConfig,
    state: TrainingState | StreamPosition,
    rank: int,
    world: int,
    device: torch.device,
    *,
    stream: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless same-shape micro-batches of this rank, epoch after epoch; keeps the position in ``state``."""
    counts, skip = store.counts, state.batches_in_epoch
    while True:
        plan = epoch_plan(counts, cfg.batch_size, world, seed=cfg.seed, epoch=state.epoch, stream=stream)
        plan = rank_plan(plan, rank, world)
        for position in range(skip, len(plan)):
            name, index = plan[position]
            state.batches_in_epoch = position + 1
            yield store.batch(name, index, device)
        skip = 0
        state.epoch += 1
        state.batches_in_epoch = 0
