"""The full demo several times in a row: the spread of its numbers, not one lucky run.

    .venv/bin/python benchmarks/demo_runs.py                      # 5 runs of `sdray demo` (~12 min each)
    .venv/bin/python benchmarks/demo_runs.py --runs 3 --out-dir runs/demo-runs
    .venv/bin/python benchmarks/demo_runs.py --collect runs/demo-a runs/demo-b   # summarise finished runs

Each run is a plain `sdray demo --out DIR --overwrite` (the committed pipelines/configs/demo.yaml), one after
the other on an otherwise idle machine. From each run's report/metrics.json and the stage configs it wrote:
total and stage times, VAE PSNR and steps, UNet steps, colour / shape / position on held-out and on all
prompts, the load average at start and end, and whether the run used the committed settings (a collected run
made with `--set` flags says which differ). Results: benchmarks/results/demo_runs.{json,md}, with the
machine, versions, the command and how many runs meet the bars (held-out colour >= 0.90, shape >= 0.80,
position >= 0.80; at most 900 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import yaml

from sdray.pipeline_config import load_pipeline_config

RESULTS = Path(__file__).resolve().parent / "results"
SDRAY = Path(sys.executable).parent / "sdray"
BARS = {"color": 0.90, "shape": 0.80, "position": 0.80}
BUDGET_S = 900.0
# The settings the demo's budget is spent on; a collected run is compared with the committed config on these.
WATCHED = {
    "vae_train": ("mixed_precision", "target_psnr", "max_steps", "batch_size", "learning_rate"),
    "train": ("mixed_precision", "max_steps", "batch_size", "learning_rate", "num_workers"),
}


def run_demo(out: Path) -> None:
    """One full `sdray demo` into ``out``; its output goes to ``out``.log beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        subprocess.run(
            [str(SDRAY), "demo", "--out", str(out), "--overwrite"], stdout=log, stderr=log, check=True
        )


def _settings(run: Path) -> dict[str, dict]:
    """The watched settings as the run's stages recorded them."""
    vae = yaml.safe_load((run / "vae" / "config.yaml").read_text())["vae_train"]
    train = yaml.safe_load((run / "train" / "train_config.yaml").read_text())
    train = train.get("train", train)
    return {
        "vae_train": {k: vae[k] for k in WATCHED["vae_train"]},
        "train": {k: train[k] for k in WATCHED["train"]},
    }


def _committed() -> dict[str, dict]:
    cfg = load_pipeline_config("demo")
    return {
        section: {k: getattr(getattr(cfg, section), k) for k in keys} for section, keys in WATCHED.items()
    }


def summarise(run: Path, committed: dict[str, dict]) -> dict:
    """One run's numbers from its report/metrics.json and stage configs."""
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    generated = metrics["faithfulness"]["generated"]
    settings = _settings(run)
    differs = {
        f"{section}.{k}": v
        for section, values in settings.items()
        for k, v in values.items()
        if v != committed[section][k]
    }
    held_out = {k: round(generated["held_out"][k], 4) for k in BARS}
    return {
        "run": str(run),
        "total_s": metrics["total_seconds"],
        "stage_s": metrics["stage_seconds"],
        "load_average": metrics["machine"]["load_avg_1_5_15"],
        "vae_psnr_db": round(metrics["vae"]["psnr_db"], 2),
        "vae_steps": metrics["vae"]["steps"],
        "unet_steps": metrics["unet"]["steps"],
        "held_out": held_out,
        "all_prompts": {k: round(generated["all"][k], 4) for k in BARS},
        "meets_bars": all(held_out[k] >= bar for k, bar in BARS.items())
        and metrics["total_seconds"] <= BUDGET_S,
        "settings_differing_from_committed": differs,
    }


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = [
        f"# The full demo, {len(runs)} runs ({result['date']})",
        "",
        f"{result['machine']}. `{result['command']}`. Versions: {json.dumps(result['versions'])}.",
        "",
        f"Committed settings: {json.dumps(result['committed_settings'])}.",
        "",
        f"**{result['runs_meeting_bars']} of {len(runs)} runs meet every bar** (held-out colour >= 0.90, "
        f"shape >= 0.80, position >= 0.80, total <= {BUDGET_S:.0f} s).",
        "",
        "| run | total s | VAE s | train s | VAE dB (steps) | UNet steps | held-out c / s / p "
        "| all prompts c / s / p | load at start, end | settings not committed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h, a, load = r["held_out"], r["all_prompts"], r["load_average"]
        lines.append(
            f"| {Path(r['run']).name} | {r['total_s']:.0f} | {r['stage_s']['vae']:.0f} | "
            f"{r['stage_s']['train']:.0f} | {r['vae_psnr_db']} ({r['vae_steps']}) | {r['unet_steps']} | "
            f"{h['color']:.2f} / **{h['shape']:.2f}** / {h['position']:.2f} | "
            f"{a['color']:.2f} / {a['shape']:.2f} / {a['position']:.2f} | {load['start'][0]}, {load['end'][0]} | "
            f"{json.dumps(r['settings_differing_from_committed']) if r['settings_differing_from_committed'] else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out-dir", default="runs/demo-runs", help="run K goes to OUT_DIR/run-K")
    parser.add_argument("--collect", nargs="+", default=[], help="summarise these finished runs, run nothing")
    parser.add_argument("--out", default="demo_runs", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    if args.collect:
        dirs = [Path(d) for d in args.collect]
    else:
        dirs = [Path(args.out_dir) / f"run-{k + 1}" for k in range(args.runs)]
        for k, out in enumerate(dirs):
            print(f"run {k + 1}/{len(dirs)} -> {out}", flush=True)
            run_demo(out)
    committed = _committed()
    runs = [summarise(d, committed) for d in dirs]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/demo_runs.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {name: version(name) for name in ("torch", "diffusers", "ray")},
        "committed_settings": committed,
        "runs": runs,
        "runs_meeting_bars": sum(r["meets_bars"] for r in runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
