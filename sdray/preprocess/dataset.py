"""Every Ray Data pipeline of sdray, one function each: stage 1 (read -> decode (CPU tasks) -> encode (actors)
-> write) and batch generation (rows -> sampler actors -> write).

Ray's `map_batches` arguments have changed across versions; keeping them here means one place to update.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from sdray import allocator
from sdray.batchgen.stages import SamplerActor, write_images
from sdray.config import to_dict
from sdray.data.cache import CacheInfo
from sdray.data.reader import read_parquet_files
from sdray.errors import ConfigError
from sdray.pipeline_config import PipelineConfig
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.encode import Encoder
from sdray.preprocess.manifest import OutputDir
from sdray.preprocess.stages import decode_batch, write_shards

_WORKER_BYTES = 640 * 1024**2  # the worker's imports (transformers: ~400 MiB) and one large source image


def encoder_gpus(requested: float) -> float:
    """GPUs per encoder actor: the configured amount when the cluster has GPUs, else 0 (CPU, fp32)."""
    return requested if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_cpus(pre: PreprocessConfig, total_cpus: float) -> None:
    """Refuse settings whose encoder actors would hold every CPU: the read/decode tasks could never start.

    Raises:
        ConfigError: naming the settings and the cluster's CPU count.
    """
    actors = pre.encode_concurrency * pre.encode_num_cpus
    need = actors + max(pre.decode_num_cpus, pre.write_num_cpus, 1.0)
    if need > total_cpus:
        raise ConfigError(
            f"the cluster has {total_cpus:g} CPUs but encoder actors take {actors:g} "
            f"(preprocess.encode_concurrency x encode_num_cpus) and read/decode tasks need at least "
            f"{need - actors:g} more, or the pipeline stalls; lower encode_num_cpus/encode_concurrency or add nodes"
        )


def decode_memory_bytes(batch_size: int, resolution: int) -> int:
    """Memory to reserve per decode task: the worker, its output (uint8, twice for the copy into a block)."""
    return batch_size * resolution * resolution * 3 * 2 + _WORKER_BYTES


def read_tasks(file_rows: list[int], *, rows_per_task: int, min_tasks: int) -> int:
    """Read tasks for input files of ``file_rows`` rows: one per file, except that small files are read
    several to a task, about ``rows_per_task`` rows each, though never in fewer than ``min_tasks`` tasks.

    Every read task's rows travel through decode, encode and write as blocks of their own, and on a small
    cluster Ray Data's per-block cost (scheduling, a task per stage, object transfers) outweighs the work
    on small blocks: 64 files of 64 tiny-model images took 33.8 s as 64 tasks and 11.2 s as 8 on 2 cores
    (benchmarks/results/preprocess_tiny_64.md). A task's files are committed once its rows are written, so a
    kill still loses at most the tasks in flight.
    """
    if not file_rows:
        return 0
    packed = -(-sum(file_rows) // max(rows_per_task, 1))
    return min(len(file_rows), max(packed, min_tasks))


def build_dataset(
    cfg: PipelineConfig,
    *,
    fs: pafs.FileSystem,
    paths: list[str],
    rows: list[int],
    out: OutputDir,
    info: CacheInfo,
) -> ray.data.Dataset:
    """The streaming pipeline over ``paths``; its rows are the write events of :func:`write_shards`.

    Nothing runs until the caller iterates the dataset; Ray Data streams blocks through the stages with
    back-pressure, so memory stays bounded whatever the number of input rows.
    """
    pre = cfg.preprocess
    check_cpus(pre, ray.cluster_resources().get("CPU", 0.0))
    ds = read_parquet_files(
        paths,
        filesystem=fs,
        columns=[pre.id_column, pre.image_column, pre.caption_column],  # only what we use
        include_paths=True,  # adds `path`: which input file (unit) each row came from
        # A map task merges what it yields into blocks of up to Ray Data's target block size, so a task
        # reading many files would carry all their rows through every stage as one block: none of them would
        # be written (or committed) until all were. Hence few rows per task, but not as few as a small file.
        tasks=read_tasks(
            rows,
            rows_per_task=pre.rows_per_shard,
            min_tasks=2 * int(ray.cluster_resources().get("CPU", 1)),
        ),
    )
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=pre.decode_batch_size,
        num_cpus=pre.decode_num_cpus,
        # A memory request also keeps Ray Data from fusing this stage into the encoder actor (it fuses ops
        # with equal resources), so decoding runs in its own tasks and overlaps encoding.
        memory=decode_memory_bytes(pre.decode_batch_size, pre.resolution),
        fn_kwargs={"cfg": to_dict(pre), "model_json": json.dumps(to_dict(cfg.model))},
    )
    ds = ds.map_batches(
        Encoder,
        batch_format="numpy",
        batch_size=pre.encode_batch_size,
        compute=ray.data.ActorPoolStrategy(size=pre.encode_concurrency),
        num_cpus=pre.encode_num_cpus,
        num_gpus=encoder_gpus(pre.encode_num_gpus),
        runtime_env=allocator.runtime_env(pre.encode_allocator),
        fn_constructor_kwargs={
            "model": to_dict(cfg.model),
            "info_json": info.to_json(),
            "num_threads": pre.encode_threads,
            "actors": pre.encode_concurrency,
            "allocator": pre.encode_allocator,
        },
    )
    return ds.map_batches(
        write_shards,
        batch_format="numpy",
        # Each block is written as it arrives: a batch of rows_per_shard rows would hold back every input
        # file's rows until that many had gathered (a small run wrote nothing before its last second), and a
        # kill would lose them all. Now it loses the blocks in flight; the ledger commits files as they finish.
        batch_size=None,
        num_cpus=pre.write_num_cpus,
        fn_kwargs={"out": out, "info_json": info.to_json(), "rows_per_shard": pre.rows_per_shard},
    )


def build_generation_dataset(cfg: PipelineConfig, rows: pa.Table, out: OutputDir) -> ray.data.Dataset:
    """`sdray batch-generate`: prompt rows -> sampler actors -> shard writer; rows are write events."""
    gen = cfg.batch_generate
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    if gen.concurrency * gen.num_cpus > total_cpus:
        raise ConfigError(
            f"the cluster has {total_cpus:g} CPUs but the sampler actors need {gen.concurrency * gen.num_cpus:g} "
            "(batch_generate.concurrency x num_cpus); lower them or add nodes"
        )
    # One block per sampler batch, so every actor of the pool gets work from the first block on.
    blocks = [rows.slice(i, gen.batch_size) for i in range(0, rows.num_rows, gen.batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        SamplerActor,
        batch_format="numpy",
        batch_size=gen.batch_size,
        compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
        num_cpus=gen.num_cpus,
        num_gpus=encoder_gpus(gen.num_gpus),
        runtime_env=allocator.runtime_env(gen.allocator),
        fn_constructor_kwargs={
            "model": to_dict(cfg.model),
            "loras": list(gen.loras),
            "batch_size": gen.batch_size,
            "threads": gen.threads,
            "actors": gen.concurrency,
            "allocator": gen.allocator,
        },
    )
    return ds.map_batches(
        write_images,
        batch_format="numpy",
        batch_size=gen.rows_per_shard,
        num_cpus=0,  # mostly I/O: never wait behind the samplers for a CPU
        fn_kwargs={"out": out, "model": cfg.model.source},
    )
