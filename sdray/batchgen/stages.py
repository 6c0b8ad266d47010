"""The two batch stages of `sdray batch-generate`: the sampler actor and the shard writer.

Output shards hold the layout `sdray preprocess` reads (``id``, ``image`` = {bytes, path} struct with PNG
bytes, ``caption`` = the prompt) plus every parameter that made the image, so a generated set is both a
training set and a record of how to regenerate each image.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sdray.allocator import Allocator, check_loaded
from sdray.batchgen.prompts import SAMPLING_FIELDS, to_request
from sdray.cluster import actor_threads
from sdray.config import from_dict
from sdray.data.cache import SHARD_PREFIX
from sdray.models.config import ModelConfig
from sdray.preprocess.inputs import unit_key
from sdray.preprocess.manifest import OutputDir
from sdray.preprocess.stages import EVENT_SCHEMA

log = logging.getLogger(__name__)

PARAMETERS = ("prompt", *(f.name for f in SAMPLING_FIELDS))
IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("caption", pa.string()),
        *SAMPLING_FIELDS,
        ("model", pa.string()),
    ]
)


class SamplerActor:
    """``map_batches`` class: loads the model (and LoRAs) once, adds ``png`` (bytes) and ``sample_s``."""

    def __init__(  # noqa: PLR0913 - the actor's settings, all keyword-only
        self,
        *,
        model: dict[str, Any],
        loras: list[str],
        batch_size: int,
        threads: int = 0,
        actors: int = 1,
        allocator: Allocator | None = None,
    ) -> None:
        if allocator:  # the one this actor was started with: warns if it did not load
            check_loaded(allocator, "sampler actor", report=True)
        from sdray.models.components import load_components
        from sdray.models.lora import LoraSpec
        from sdray.serve.sampler import Sampler

        model_cfg = from_dict(ModelConfig, model, where="model")
        cuda = torch.cuda.is_available()
        if not cuda:  # Ray sets OMP_NUM_THREADS to the reserved CPUs: often 1
            torch.set_num_threads(actor_threads(threads, actors))
        self.sampler = Sampler(
            load_components(model_cfg),
            source=model_cfg.source,
            device="cuda" if cuda else "cpu",
            dtype="float16" if cuda else "float32",
            loras=[LoraSpec.parse(text) for text in loras],
        )
        self.batch_size = batch_size
        log.info("sampler actor: %s on %s, loras %s", model_cfg.source, self.sampler.device, loras)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sdray.serve.sampler import to_png

        start = time.perf_counter()
        n = len(batch["id"])
        rows = [{k: batch[k][i] for k in (*PARAMETERS, "id")} for i in range(n)]
        images = self.sampler.generate([to_request(r) for r in rows], max_batch=self.batch_size)
        pngs = np.empty(n, dtype=object)
        pngs[:] = [to_png(per_request[0]) for per_request in images]
        return {**batch, "png": pngs, "sample_s": np.full(n, (time.perf_counter() - start) / max(n, 1))}


def _shard_name(unit: str, ids: list[str]) -> str:
    """Named by the unit and its rows, so a retried task overwrites instead of duplicating."""
    digest = hashlib.sha1("\0".join(ids).encode()).hexdigest()[:16]
    return f"{SHARD_PREFIX}{unit_key(unit)}-{digest}.parquet"


def image_table(batch: dict[str, np.ndarray], rows: np.ndarray, model: str) -> pa.Table:
    """The output shard of ``rows`` of a sampled batch."""
    ids = [str(v) for v in batch["id"][rows].tolist()]
    pngs = batch["png"][rows].tolist()
    return pa.Table.from_pydict(
        {
            "id": ids,
            "image": [{"bytes": png, "path": f"{row_id}.png"} for png, row_id in zip(pngs, ids, strict=True)],
            "caption": [str(v) for v in batch["prompt"][rows].tolist()],
            **{k: batch[k][rows].tolist() for k in PARAMETERS[1:]},
            "model": [model] * len(rows),
        },
        schema=IMAGE_SCHEMA,
    )


def write_images(batch: dict[str, np.ndarray], *, out: OutputDir, model: str) -> pa.Table:
    """Write stage: one shard per prompt file present in the batch; events for the driver's ledger."""
    events = []
    for unit in sorted(set(batch["unit"].tolist())):
        start = time.perf_counter()
        rows = np.flatnonzero(batch["unit"] == unit)
        table = image_table(batch, rows, model)
        name = _shard_name(unit, table.column("id").to_pylist())
        size = out.write_shard(name, table)
        events.append(
            {
                "unit": unit,
                "kind": "shard",
                "name": name,
                "rows": len(rows),
                "reason": "",
                "detail": "",
                "bytes": size,
                "decode_s": 0.0,
                "encode_s": float(batch["sample_s"][rows].sum()),
                "write_s": time.perf_counter() - start,
                "long_captions": 0,
            }  # fmt: skip
        )
    return pa.Table.from_pylist(events, schema=EVENT_SCHEMA)
