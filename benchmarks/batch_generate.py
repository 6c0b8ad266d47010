"""Batch generation throughput: `sdray batch-generate` (Ray Data actor pool) against a plain loop over the
same sampler (same model, prompts, steps, batch size, machine). One run of each.

    .venv/bin/python benchmarks/batch_generate.py --preset tiny --num-prompts 32 --steps 10
    .venv/bin/python benchmarks/batch_generate.py --model runs/base/model --num-prompts 64 --concurrency 2

Writes benchmarks/results/batch_generate_<preset>.json and .md:
- `plain`: one process, `Sampler.generate` over the prompts in chunks of `--batch-size`, PNG-encoded, model load
  excluded (torch uses every core);
- `ray`: `run_batch_generate` (actor pool -> shard writer) end to end, including the actors' model load and the
  parquet writes, but not `ray.init`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from sdray.batchgen.prompts import to_request
from sdray.batchgen.run import run_batch_generate
from sdray.models.components import load_components
from sdray.pipeline_config import load_pipeline_config
from sdray.serve.sampler import Sampler, to_png

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = (
    "a large red circle in the top left",
    "a small blue square in the bottom right",
    "a green triangle",
)


def plain_loop(cfg, rows: list[dict]) -> float:
    """Seconds to generate and PNG-encode ``rows`` in one process, model load excluded."""
    torch.set_num_threads(os.cpu_count() or 1)
    sampler = Sampler(load_components(cfg.model), source=cfg.model.source)
    start = time.perf_counter()
    images = sampler.generate([to_request(r) for r in rows], max_batch=cfg.batch_generate.batch_size)
    _ = [to_png(per_request[0]) for per_request in images]
    return time.perf_counter() - start


def write_results(result: dict, name: str) -> None:
    """benchmarks/results/<name>.json and a one-row markdown table beside it."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(
        "| images | steps | size | batch | actors | plain loop (img/s) | batch-generate (img/s) | machine |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {result['images']} | {result['steps']} | {result['size']} | {result['batch_size']} | "
        f"{result['concurrency']} | {result['plain_images_per_s']} | {result['ray_images_per_s']} | "
        f"{result['machine']} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="packaged config (tiny, sd15)")
    parser.add_argument("--model", default="", help="a diffusers model directory instead of the preset")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--size", type=int, default=0, help="image side; 0 = the model's native size")
    args = parser.parse_args()

    overrides = [
        f"batch_generate.steps={args.steps}",
        f"batch_generate.batch_size={args.batch_size}",
        f"batch_generate.concurrency={args.concurrency}",
        f"batch_generate.width={args.size}",
        f"batch_generate.height={args.size}",
        "batch_generate.scheduler=ddim",
    ] + ([f"model.path={args.model}"] if args.model else [])
    cfg = load_pipeline_config(args.preset, overrides)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        lines = [
            {"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(args.num_prompts)
        ]
        prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
        gen = dataclasses.replace(cfg.batch_generate, prompts=str(prompts), output=str(Path(tmp) / "out"))
        cfg = dataclasses.replace(cfg, batch_generate=gen)
        start = time.perf_counter()
        summary = run_batch_generate(cfg)
        ray_s = time.perf_counter() - start
        rows = [
            {k: v for k, v in r.items() if k != "image"} for r in pq.read_table(Path(tmp) / "out").to_pylist()
        ]
        rows = [{**r, "prompt": r["caption"]} for r in rows]
        plain_s = plain_loop(cfg, rows)
    n = summary["rows_written"]
    result = {
        "preset": args.preset,
        "model": cfg.model.source,
        "images": n,
        "steps": args.steps,
        "size": rows[0]["width"] if rows else 0,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "plain_s": round(plain_s, 2),
        "plain_images_per_s": round(n / plain_s, 3),
        "ray_s": round(ray_s, 2),
        "ray_images_per_s": round(n / ray_s, 3),
        "ray_sample_task_s": summary["this_run"]["sample_task_s"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end)",
    }
    write_results(result, f"batch_generate_{args.preset if not args.model else 'model'}")
    print(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
