"""Stage 1 throughput: the Ray Data pipeline against a plain single-process loop (same model, images, machine).

    .venv/bin/python benchmarks/preprocess_throughput.py --preset tiny --resolution 64 --num-images 1024 4096
    .venv/bin/python benchmarks/preprocess_throughput.py --preset sd15 --resolution 256 --num-images 16 64

Writes benchmarks/results/preprocess_<preset>_<resolution>.{json,md}. For each data set size N (64-row input
files) it times, end to end:
- `plain`: one process loads the encoders and runs the same decode/encode/write functions in a loop (torch
  uses every core);
- `ray`: `run_preprocess` on a running local Ray (the driver's encoder load for the cache metadata, decode
  tasks -> encoder actor (its own model load) -> write tasks, the manifest commits); `ray.init` is not counted,
  as a cluster is already up in real use. Also when the first and the last input file were committed, which
  shows that output streams out while encoding goes on.
With two sizes it also reports the marginal rate (N2 - N1) / (t2 - t1): the steady state once the fixed costs
are paid, which is what matters at millions of images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from sdray.config import to_dict
from sdray.data import cache
from sdray.data.images import decode_pixels, open_checked, pick_caption
from sdray.data.synth import SynthConfig, write_synth
from sdray.models.components import load_components
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess.encode import Encoder
from sdray.preprocess.run import cache_info, run_preprocess

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loop(cfg, data: Path, out: Path) -> float:
    """Seconds to preprocess ``data`` in one process, model load included."""
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
    return time.perf_counter() - start


def watch_commits(manifest: Path, start: float, files: int) -> tuple[list[float], Callable[[], None]]:
    """Seconds after ``start`` at which the manifest held its first and its last (``files``-th) record."""
    seen: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and len(seen) < 2:
            count = len(list(manifest.glob("*.json"))) if manifest.is_dir() else 0
            if count and not seen or count >= files and len(seen) == 1:
                seen.append(round(time.perf_counter() - start, 2))
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return seen, lambda: (stop.set(), thread.join())


def ray_pipeline(cfg, files: int) -> dict:
    """End-to-end seconds of ``run_preprocess`` and when the first and last input file were committed."""
    start = time.perf_counter()
    commits, stop = watch_commits(Path(cfg.preprocess.output) / "_manifest", start, files)
    summary = run_preprocess(cfg)
    seconds = time.perf_counter() - start
    stop()
    return {"s": seconds, "pipeline_s": summary["this_run"]["wall_s"], "commits_s": commits}


def markdown(result: dict) -> str:
    """A short table of ``result`` (the JSON) for benchmarks/results/."""
    lines = [
        f"# Preprocess end to end: {result['preset']} at {result['resolution']} px ({result['date']})",
        "",
        f"{result['machine']}; load average {result['load_average_at_start'][0]:.2f} at start, "
        f"{result['load_average_at_end'][0]:.2f} at end. `{result['command']}`",
        "",
        "| images | plain s | ray s | ray / plain speed | ray pipeline s | first / last file committed at s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        first, last = (r["commits_s"] + ["-", "-"])[:2]
        lines.append(
            f"| {r['images']} | {r['plain_s']} | {r['ray_s']} | {r['speedup']}x | {r['ray_pipeline_s']} "
            f"| {first} / {last} |"
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
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="sdray-bench-"))
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/preprocess_throughput.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {cores} cores, no GPU",
        "versions": {name: version(name) for name in ("torch", "ray", "diffusers", "pyarrow")},
        "load_average_at_start": os.getloadavg(),
        "preset": args.preset,
        "resolution": args.resolution,
        "ray": f"num_cpus={cores}; decode tasks 1 CPU, one encoder actor (1 CPU reserved, {cores} torch threads)",
        "runs": [],
    }
    try:
        for n in args.num_images:
            data = write_synth(
                SynthConfig(num_images=n, resolution=args.resolution, rows_per_shard=64), work / f"in{n}"
            )
            cfg = load_pipeline_config(
                args.preset,
                [
                    f"preprocess.input={data}",
                    f"preprocess.output={work / f'ray{n}'}",
                    f"preprocess.resolution={args.resolution}",
                    f"preprocess.encode_batch_size={args.encode_batch_size}",
                    f"preprocess.encode_threads={cores}",
                ],
            )
            (work / f"plain{n}").mkdir()
            plain_s = plain_loop(cfg, data, work / f"plain{n}")
            timed = ray_pipeline(cfg, files=-(-n // 64))
            ray_s = timed["s"]
            run = {"images": n, "plain_s": round(plain_s, 2), "ray_s": round(ray_s, 2),
                   "speedup": round(plain_s / ray_s, 2), "ray_pipeline_s": timed["pipeline_s"],
                   "commits_s": timed["commits_s"],
                   "plain_images_per_s": round(n / plain_s, 2), "ray_images_per_s": round(n / ray_s, 2)}  # fmt: skip
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
        ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"preprocess_{args.preset}_{args.resolution}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
