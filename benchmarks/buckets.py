"""Aspect-ratio buckets against the square crop: pixels kept, cache size, training speed, demo faithfulness.

    PYTHONPATH=. .venv/bin/python benchmarks/buckets.py --parts pixels,cache      # cheap: ~2 min
    PYTHONPATH=. .venv/bin/python benchmarks/buckets.py --parts train              # needs a quiet machine
    PYTHONPATH=. .venv/bin/python benchmarks/buckets.py --parts demo --demo-square runs/demo
        # runs `sdray demo --config demo_buckets` into runs/demo-buckets and compares with a square demo run
        # (or with a committed one: --demo-square benchmarks/results/demo_full.json)
    PYTHONPATH=. .venv/bin/python benchmarks/buckets.py --parts demo_square_vae --vae-run runs/demo

Parts (results merge into benchmarks/results/buckets.json and buckets.md, one key per part):
- pixels: share of each image's pixels that reaches the cache, buckets vs square crop, for the synth mix
  (64x64, 96x64, 64x96 at 64 px, step 16) and a photo-like mix of aspect ratios at 512 px (SD 1.5's ladder);
- cache: preprocess the same mixed synth set (tiny model) both ways: rows, bytes, bytes per row, rows per bucket;
- train: tiny UNet, 1 worker, the same number of steps on each cache (same batch size: the bucket ladder keeps
  every bucket at <= the square's area, so the pixel budget per batch is the same or lower): samples/s and
  image pixels/s from the run's metrics, with and without the data wait (a square cache streams through Ray
  Data, which restarts every epoch: on a small cache that wait dominates; a bucketed cache is read into each
  worker's memory once);
- demo: the bucketed demo's caption faithfulness per generated size next to the square demo's;
- demo_square_vae: the bucketed demo again, but on the VAE of a square-scene demo run (`--vae-run`).
Timing parts are only meaningful on an idle machine: the machine's load average is recorded with every part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from sdray.data.buckets import bucket_ladder, cover_crop, nearest_bucket

RESULTS = Path(__file__).resolve().parent / "results"
MIX = ("64x64", "96x64", "64x96")
PHOTO_MIX = {"1:1": 0.2, "4:3": 0.25, "3:2": 0.2, "16:9": 0.15, "3:4": 0.1, "2:3": 0.05, "9:16": 0.05}


def kept_shares(sizes: list[tuple[int, int]], resolution: int, step: int) -> dict:
    """Mean share of source pixels kept, buckets vs square, for (height, width) images."""
    ladder = bucket_ladder(resolution, step, 2.0)
    square = [cover_crop(h, w, (resolution, resolution)).kept_share for h, w in sizes]
    bucketed = [cover_crop(h, w, nearest_bucket(h, w, ladder)).kept_share for h, w in sizes]
    return {"images": len(sizes), "square": round(statistics.mean(square), 4),
            "buckets": round(statistics.mean(bucketed), 4), "worst_bucketed": round(min(bucketed), 4)}  # fmt: skip


def part_pixels() -> dict:
    synth = [(int(t.split("x")[1]), int(t.split("x")[0])) for t in MIX]
    photo: list[tuple[int, int]] = []
    for ratio, weight in PHOTO_MIX.items():
        w, h = (int(v) for v in ratio.split(":"))
        photo += [(h * 1000 // max(w, h), w * 1000 // max(w, h))] * round(weight * 100)
    return {
        "synth_mix_64px_step16": kept_shares(synth, 64, 16),
        "photo_mix_512px_step64": kept_shares(photo, 512, 64),
    }


def _preprocess(data: Path, out: Path, buckets: bool) -> dict:
    from sdray.pipeline_config import load_pipeline_config
    from sdray.preprocess.run import run_preprocess

    sets = [f"preprocess.input={data}", f"preprocess.output={out}", "preprocess.encode_batch_size=32"]
    if buckets:
        sets += ["preprocess.buckets=true", "preprocess.bucket_step=16"]
    summary = run_preprocess(load_pipeline_config("tiny", sets))
    size = sum(p.stat().st_size for p in out.glob("part-*.parquet"))
    rows = summary["rows_written"]
    return {"rows": rows, "shard_bytes": size, "bytes_per_row": round(size / rows),
            "buckets": summary.get("buckets", {}), "wall_s": summary["this_run"]["wall_s"]}  # fmt: skip


def part_cache(work: Path, images: int) -> dict:
    from sdray.data.synth import SynthConfig, write_synth

    data = write_synth(SynthConfig(num_images=images, resolution=64, aspect_sizes=MIX), work / "data")
    return {
        "square": _preprocess(data, work / "square", False),
        "buckets": _preprocess(data, work / "buckets", True),
    }


def _train(cache: Path, out: Path, steps: int, materialize: bool = False) -> dict:
    from sdray.models.config import ModelConfig
    from sdray.train.config import TrainConfig
    from sdray.train.metrics import read_metrics
    from sdray.train.run import run_training

    cfg = TrainConfig(data=str(cache), output=str(out), batch_size=16, max_steps=steps, log_every=steps,
                      checkpoint_every=steps, validate_every=-1, export=False, shuffle_buffer=0,
                      materialize=materialize)  # fmt: skip
    run_training(cfg, ModelConfig())
    rows = read_metrics(str(out))[steps // 4 :]  # skip the warm-up steps
    seconds = sum(r["step_time_s"] for r in rows)
    # image pixels per step are not in the metrics: the cache's mean row area times the batch
    info = json.loads((cache / "_cache.json").read_text())
    counts = info.get("bucket_counts") or {f"{info['resolution']}x{info['resolution']}": 1}
    area = sum(int(k.split("x")[0]) * int(k.split("x")[1]) * n for k, n in counts.items()) / sum(
        counts.values()
    )
    pixels = area * 16 * len(rows)
    wait = statistics.mean(r["data_wait_s"] for r in rows)
    compute = seconds - wait * len(rows)  # the square cache streams through Ray Data; buckets are in memory
    return {"steps_timed": len(rows), "samples_per_s": round(16 * len(rows) / seconds, 2),
            "image_pixels_per_s": round(pixels / seconds), "data_wait_s_mean": round(wait, 5),
            "compute_samples_per_s": round(16 * len(rows) / compute, 2),
            "compute_image_pixels_per_s": round(pixels / compute)}  # fmt: skip


def part_train(work: Path, images: int, steps: int) -> dict:
    caches = part_cache(work, images)
    runs = {kind: _train(work / kind, work / f"train-{kind}", steps) for kind in caches}
    # the square cache held in Ray's object store (train.materialize): the same data path minus the re-reads
    runs["square_materialized"] = _train(work / "square", work / "train-square-mat", steps, materialize=True)
    return runs | {"caches": caches}


def part_demo(square_run: str, out: str, overrides: list[str]) -> dict:
    from sdray.demo import DemoOptions, demo_config, run_demo

    cfg = demo_config("demo_buckets", overrides, quick=False)
    report = run_demo(DemoOptions(output=out, overwrite=True), cfg)
    buckets = json.loads((report / "metrics.json").read_text())["faithfulness"]
    # A square run directory, or a committed demo result (benchmarks/results/demo_full.json)
    reference = (
        Path(square_run) if square_run.endswith(".json") else Path(square_run) / "report" / "metrics.json"
    )
    square = json.loads(reference.read_text())["faithfulness"]
    by_size = buckets.get("generated_by_size")
    return {"square": square["generated"], "buckets": buckets["generated"], "buckets_by_size": by_size}


def part_demo_square_vae(vae_run: str, out: str, overrides: list[str]) -> dict:
    """The bucketed demo with the VAE (and text encoder) of a square-scene demo run instead of its own.

    The demo's VAE trains on square centre crops; of a 96x64 or 64x96 scene that crop cuts the shapes of two
    quadrants in half. Reusing a VAE that saw whole shapes tells whether the VAE or the UNet's bucketed
    training loses shape. The data, preprocess, UNet, sampling and scoring are the bucketed demo's own stages.
    """
    import shutil

    from sdray.demo import DemoOptions, demo_config
    from sdray.demo import run as stages
    from sdray.demo.results import DemoRun

    run_dir = Path(out).absolute()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    shutil.copytree(Path(vae_run) / "model", run_dir / "model")
    cfg = demo_config("demo_buckets", overrides, quick=False)
    run = DemoRun(out=run_dir, cfg=cfg, opts=DemoOptions(output=str(run_dir)).effective())
    stages.run_stages(run, ["data", "preprocess", "train", "generate", "evaluate"], progress=print)
    metrics = run.results.faithfulness
    by_size = metrics["generated_by_size"]
    return {"vae_from": vae_run, "buckets": metrics["generated"], "buckets_by_size": by_size}


DEMO_LABELS = {
    "demo": "bucketed demo (mixed aspects, its own VAE)",
    "demo_square_vae": "bucketed demo (mixed aspects) on a square-scene run's VAE",
    "demo_square_scenes_bucket_path": "square scenes only, through the bucket path",
}


def demo_table(merged: dict) -> list[str]:
    """Colour / shape / position of every demo result, overall and per generated size (WxH)."""
    lines = [
        "## Demo runs: colour / shape / position accuracy of the generated images",
        "",
        "| result | all sizes | " + " | ".join(f"{s} (WxH)" for s in ("80x48", "64x64", "48x80")) + " |",
        "|---|---|---|---|---|",
    ]

    def cell(score: dict | None) -> str:
        return "" if not score else f"{score['color']:.2f} / {score['shape']:.2f} / {score['position']:.2f}"

    for key, value in merged.items():
        if "demo" not in key:
            continue
        rows = {"square demo (reference)": (value["square"]["all"], {})} if key == "demo" else {}
        label = " ".join([DEMO_LABELS.get(key.split(" ")[0], key), *key.split(" ")[1:]])
        rows[f"{label} (`{key.split(' ')[0]}`)"] = (
            value["buckets"]["all"],
            value.get("buckets_by_size") or {},
        )
        for name, (overall, by_size) in rows.items():
            sizes = [cell((by_size.get(s) or {}).get("all")) for s in ("80x48", "64x64", "48x80")]
            lines.append(f"| {name} | {cell(overall)} | {' | '.join(sizes)} |")
    return lines


def write(results: dict) -> None:
    path = RESULTS / "buckets.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    lines = ["# Aspect-ratio buckets vs square crop (`benchmarks/buckets.py`)", "", *demo_table(merged), ""]
    for part, value in merged.items():
        lines += [f"## {part}", "", "```json", json.dumps(value, indent=2), "```", ""]
    (RESULTS / "buckets.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", default="pixels,cache", help="comma-separated: pixels,cache,train,demo,demo_square_vae"
    )
    parser.add_argument("--images", type=int, default=96, help="synth images for cache/train")
    parser.add_argument("--steps", type=int, default=40, help="training steps per cache (train)")
    parser.add_argument(
        "--demo-square", default="runs/demo", help="a finished square `sdray demo` run, or its metrics .json"
    )
    parser.add_argument("--demo-out", default="runs/demo-buckets", help="where the bucketed demo runs (demo)")
    parser.add_argument(
        "--demo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override of the demo parts (repeatable), e.g. train.max_steps=2400; part of the result's key",
    )
    parser.add_argument(
        "--vae-run",
        default="runs/demo",
        help="a demo run on square scenes whose model/ (VAE) demo_square_vae uses",
    )
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sdray-buckets-") as tmp:
        for part in args.parts.split(","):
            load = [round(x, 2) for x in os.getloadavg()]
            start = time.perf_counter()
            if part == "pixels":
                value = part_pixels()
            elif part == "cache":
                value = part_cache(Path(tmp) / "cache", args.images)
            elif part == "train":
                value = part_train(Path(tmp) / "train", args.images, args.steps)
            elif part == "demo":
                value = part_demo(args.demo_square, args.demo_out, args.demo_set)
            elif part == "demo_square_vae":
                value = part_demo_square_vae(args.vae_run, args.demo_out + "-square-vae", args.demo_set)
            else:
                raise SystemExit(f"unknown part {part!r}")
            wall = round(time.perf_counter() - start, 1)
            key = f"{part} ({', '.join(args.demo_set)})" if args.demo_set and "demo" in part else part
            results[key] = {**value, "wall_s": wall, "load_avg_1_5_15_at_start": load}
            print(key, json.dumps(results[key]))
    write(results)


if __name__ == "__main__":
    main()
