"""Stage 1 throughput: the Ray Data pipeline against a plain single-process loop (same model, images, machine).

    .venv/bin/python benchmarks/preprocess_throughput.py --preset tiny --resolution 64 --num-images 1024 4096
    .venv/bin/python benchmarks/preprocess_throughput.py --preset sd15 --resolution 256 --num-images 16 64

Writes benchmarks/results/preprocess_<preset>_<resolution>.{json,md}. For each data set size N (64-row input
files) it times, end to end:
- `plain`: one process loads the encoders and runs the same decode/encode/write functions in a loop (torch
  uses every core);
- `ray`: `run_preprocess` on a running local Ray (the driver's encoder load for the cache metadata, decode
  tasks -> encoder actor (its own model load) -> write tasks, the manifest commits); `ray.init` is not counted,
  as a cluster is already up in real use, but each size gets a Ray of its own, started before and stopped
  after it: a real run is a job of its own, whose worker processes start (and import) anew, so a run must
  not inherit the warm workers of the one before. Also when the first and the last input file were
  committed, which shows that output streams out while encoding goes on.
- `floor`: Ray's own cost for the same plan on a fresh Ray: sdray's `dataset.build_dataset` with its three
  stages swapped for stand-ins that pass the rows through (the same read tasks, resources and runtime_env; the
  encoder actor only imports what the encoder imports: torch, transformers, diffusers): no model load, no
  decoding, encoding or writing. What the pipeline takes above it is sdray's (and the work's); where the floor
  alone exceeds the plain loop, no pipeline of this shape can match the loop at that size on this machine.
`--file-per-task` also times the pipeline with one read task per input file, as it ran before small files
were packed several to a task (2026-12-04), side by side in the same run.
With two sizes it also reports the marginal rate (N2 - N1) / (t2 - t1): the steady state once the fixed costs
are paid, which is what matters at millions of images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from results_file import publish, run_header

from sdray.config import to_dict
from sdray.data import cache
from sdray.data.cache import CacheInfo
from sdray.data.images import decode_pixels, open_checked, pick_caption
from sdray.data.synth import SynthConfig, write_synth
from sdray.models.components import load_components
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess import dataset
from sdray.preprocess.encode import Encoder
from sdray.preprocess.inputs import resolve_inputs, row_counts
from sdray.preprocess.manifest import OutputDir
from sdray.preprocess.run import cache_info, run_preprocess


def plain_loop(cfg, data: Path, out: Path) -> tuple[float, CacheInfo]:
    """Seconds to preprocess ``data`` in one process, model load included, and the cache's metadata."""
    pre = cfg.preprocess
    start = time.perf_counter()
    components = load_components(cfg.model, parts=("tokenizer", "text_encoder", "vae"))
    info = cache_info(components, cfg)
    encoder = Encoder(model=to_dict(cfg.model), info_json=info.to_json(), num_threads=os.cpu_count() or 1)
    tok = components.tokenizer
    for k, shard in enumerate(sorted(data.glob("*.parquet"))):
        rows = pq.read_table(shard).to_pylist()
        for b in range(0, len(rows), pre.encode_batch_size):
            batch = rows[b : b + pre.encode_batch_size]
            captions = [pick_caption(r["caption"], pre.caption_strategy, r["id"]) for r in batch]
            pixels = [
                decode_pixels(open_checked(r["image"]["bytes"], min_side=1, max_pixels=10**9), pre.resolution)
                for r in batch
            ]
            ids = tok(
                captions, padding="max_length", max_length=tok.model_max_length, return_tensors="np"
            ).input_ids
            enc = encoder.encode(np.stack(pixels), ids)
            table = cache.to_table(
                info,
                ids=[r["id"] for r in batch],
                latents=enc["latent"],
                text_embeds=enc["text_embeds"],
                captions=captions,
            )
            pq.write_table(table, out / f"part-{k}-{b}.parquet")
    return time.perf_counter() - start, info


def watch_commits(manifest: Path, start: float, files: int) -> tuple[list[float], Callable[[], None]]:
    """Seconds after ``start`` at which the manifest held its first and its last (``files``-th) record."""
    seen: list[float] = []
    stop = threading.Event()

    def check() -> None:
        count = len(list(manifest.glob("*.json"))) if manifest.is_dir() else 0
        if count and not seen or count >= files and len(seen) == 1:
            seen.append(round(time.perf_counter() - start, 2))

    def poll() -> None:
        while not stop.is_set() and len(seen) < 2:
            check()
            time.sleep(0.01)

    def finish() -> None:  # commits made in the poll's last 10 ms are seen here, timed at the end
        stop.set()
        thread.join()
        check()
        check()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return seen, finish


def ray_pipeline(cfg, files: int, cores: int) -> dict:
    """End-to-end seconds of ``run_preprocess`` on a fresh local Ray (its start and stop not counted) and
    when the first and last input file were committed."""
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        commits, stop = watch_commits(Path(cfg.preprocess.output) / "_manifest", start, files)
        summary = run_preprocess(cfg)
        seconds = time.perf_counter() - start
        stop()
    finally:
        ray.shutdown()
    return {"s": seconds, "pipeline_s": summary["this_run"]["wall_s"], "commits_s": commits}


class ImportOnlyEncoder:
    """The encoder stage's stand-in: the actor's process and imports, no model load, rows passed through."""

    def __init__(self, **_) -> None:
        import sdray.models.components  # noqa: F401 - torch, transformers, diffusers: what the encoder imports

    def __call__(self, batch: dict) -> dict:
        return batch


def import_tokenizer(batch: pa.Table, **_) -> pa.Table:
    """The decode stage's stand-in: its worker imports the tokenizer's library, as decode_batch does."""
    from transformers import CLIPTokenizer  # noqa: F401

    return batch


def pass_through(batch: dict, **_) -> dict:
    """The write stage's stand-in: writes nothing."""
    return batch


@contextlib.contextmanager
def stand_in_stages():
    """sdray's plan (dataset.build_dataset) with its three stages doing no work."""
    real = dataset.decode_batch, dataset.Encoder, dataset.write_shards
    dataset.decode_batch, dataset.Encoder, dataset.write_shards = (
        import_tokenizer,
        ImportOnlyEncoder,
        pass_through,
    )
    try:
        yield
    finally:
        dataset.decode_batch, dataset.Encoder, dataset.write_shards = real


def ray_floor(cfg, info: CacheInfo, cores: int) -> float:
    """End-to-end seconds of the pipeline's plan with every stage passing rows through (see the module doc)."""
    pre = cfg.preprocess
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        fs, files = resolve_inputs(pre.input)
        rows = row_counts(fs, files, pre)
        with stand_in_stages():
            ds = dataset.build_dataset(
                cfg,
                fs=fs,
                paths=[f.path for f in files],
                rows=[rows[f.path] for f in files],
                out=OutputDir(pre.output),
                info=info,
            )
            for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                pass
        return time.perf_counter() - start
    finally:
        ray.shutdown()


@contextlib.contextmanager
def one_read_task_per_file():
    """The read planning of before 2026-12-04: a task per input file, however small."""
    packed = dataset.read_tasks
    dataset.read_tasks = lambda file_rows, **_: len(file_rows)
    try:
        yield
    finally:
        dataset.read_tasks = packed


def pipeline_config(args: argparse.Namespace, data: Path, out: Path, cores: int):
    return load_pipeline_config(
        args.preset,
        [
            f"preprocess.input={data}",
            f"preprocess.output={out}",
            f"preprocess.resolution={args.resolution}",
            f"preprocess.encode_batch_size={args.encode_batch_size}",
            f"preprocess.encode_threads={cores}",
        ],
    )


def markdown(result: dict) -> str:
    """A short table of ``result`` (the JSON) for benchmarks/results/."""
    lines = [
        f"# Preprocess end to end: {result['preset']} at {result['resolution']} px ({result['date']})",
        "",
        f"{result['machine']}; load average {result['load_average_at_start'][0]:.2f} at start, "
        f"{result['load_average_at_end'][0]:.2f} at end. `{result['command']}`",
        "",
        "| images | plain s | ray s | ray / plain speed | ray pipeline s | first / last file committed at s "
        "| ray floor s | ray above floor s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_file = any("ray_file_per_task_s" in r for r in result["runs"])
    if per_file:
        lines[-2] += " ray, a read task per file s | packed / per file |"
        lines[-1] += "---|---|"
    for r in result["runs"]:
        first, last = (r["commits_s"] + ["-", "-"])[:2]
        lines.append(
            f"| {r['images']} | {r['plain_s']} | {r['ray_s']} | {r['speedup']}x | {r['ray_pipeline_s']} "
            f"| {first} / {last} | {r['ray_floor_s']} | {round(r['ray_s'] - r['ray_floor_s'], 2)} |"
            + (f" {r['ray_file_per_task_s']} | {r['packed_vs_file_per_task']}x |" if per_file else "")
        )
    if "marginal_images_per_s" in result:
        m = result["marginal_images_per_s"]
        lines += ["", f"Marginal rate (steady state): plain {m['plain']}, ray {m['ray']} images/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-images", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--encode-batch-size", type=int, default=16)
    parser.add_argument(
        "--file-per-task",
        action="store_true",
        help="also time one read task per input file (the old planning)",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="sdray-bench-"))
    result = {
        **run_header(__file__),
        "preset": args.preset,
        "resolution": args.resolution,
        "ray": f"num_cpus={cores}, a fresh local Ray for each size and for the floor; decode tasks 1 CPU, one "
        f"encoder actor (1 CPU reserved, {cores} torch threads)",
        "runs": [],
    }
    try:
        for n in args.num_images:
            data = write_synth(
                SynthConfig(num_images=n, resolution=args.resolution, rows_per_shard=64), work / f"in{n}"
            )
            cfg = pipeline_config(args, data, work / f"ray{n}", cores)
            (work / f"plain{n}").mkdir()
            plain_s, info = plain_loop(cfg, data, work / f"plain{n}")
            timed = ray_pipeline(cfg, files=-(-n // 64), cores=cores)
            floor_s = ray_floor(pipeline_config(args, data, work / f"floor{n}", cores), info, cores)
            ray_s = timed["s"]
            run = {"images": n, "plain_s": round(plain_s, 2), "ray_s": round(ray_s, 2),
                   "speedup": round(plain_s / ray_s, 2), "ray_pipeline_s": timed["pipeline_s"],
                   "commits_s": timed["commits_s"], "ray_floor_s": round(floor_s, 2),
                   "plain_images_per_s": round(n / plain_s, 2), "ray_images_per_s": round(n / ray_s, 2)}  # fmt: skip
            if args.file_per_task:
                with one_read_task_per_file():
                    per_file_cfg = pipeline_config(args, data, work / f"ray{n}-per-file", cores)
                    per_file = ray_pipeline(per_file_cfg, files=-(-n // 64), cores=cores)
                run["ray_file_per_task_s"] = round(per_file["s"], 2)
                run["packed_vs_file_per_task"] = round(per_file["s"] / ray_s, 2)
            print(run, flush=True)
            result["runs"].append(run)
        if len(result["runs"]) >= 2:
            a, b = result["runs"][0], result["runs"][-1]
            dn = b["images"] - a["images"]
            result["marginal_images_per_s"] = {
                "plain": round(dn / (b["plain_s"] - a["plain_s"]), 2),
                "ray": round(dn / (b["ray_s"] - a["ray_s"]), 2),
            }
        result["load_average_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(f"preprocess_{args.preset}_{args.resolution}", result, markdown(result))


if __name__ == "__main__":
    main()
