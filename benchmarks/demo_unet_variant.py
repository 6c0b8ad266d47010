"""Retrain only the UNet of a finished demo run with other train settings, then sample and score it the same way.

    .venv/bin/python benchmarks/demo_unet_variant.py --run runs/demo --out runs/demo-v \
        --set train.loss.prediction_type=v_prediction
    # writes OUT/report/ like `sdray demo` and benchmarks/results/demo_variant_<name>.json with --name

    .venv/bin/python benchmarks/demo_unet_variant.py --run runs/demo --out runs/demo-step500 \
        --model runs/demo-step500-model   # an exported checkpoint (`sdray export`): only sample and score

Reuses RUN's data set, VAE, model directory and latent cache (symlinked), so a variant of the UNet objective
costs only the train, generate and evaluate stages. Stage settings: the `demo` config plus --set overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sdray.demo import DemoOptions, demo_config
from sdray.demo.report import write_report
from sdray.demo.results import DataResult, DemoRun, UnetResult, VaeResult
from sdray.demo.run import ensure_ray, prepare_output, stage_evaluate, stage_generate, stage_train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a finished `sdray demo` run directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model", default="", help="score this exported UNet model instead of training")
    parser.add_argument(
        "--guidance", type=float, default=DemoOptions.guidance_scale, help="sampling CFG scale"
    )
    parser.add_argument("--scheduler", default=DemoOptions.scheduler, help="sampling scheduler")
    parser.add_argument("--name", default="", help="also write benchmarks/results/demo_variant_NAME.json")
    args = parser.parse_args()

    source = Path(args.run).absolute()
    opts = DemoOptions(output=args.out, guidance_scale=args.guidance, scheduler=args.scheduler)
    run = DemoRun(out=prepare_output(opts), cfg=demo_config("demo", args.overrides, quick=False), opts=opts)
    for part in ("data", "model", "cache"):
        (run.out / part).symlink_to(source / part)
    vae = json.loads((source / "vae" / "metrics.json").read_text())
    run.results.data = DataResult(images=run.cfg.synth.num_images, held_out=run.cfg.synth.held_out)
    run.results.vae = VaeResult(psnr_db=vae["psnr"], steps=vae["steps"], train_seconds=vae["train_seconds"],
                                scaling_factor=vae["scaling_factor"], history=vae["history"])  # fmt: skip
    run.results.preprocess = json.loads((source / "cache" / "_summary.json").read_text())
    for name in ("data", "vae", "preprocess"):  # reused from RUN, not rerun
        run.stage_s[f"{name} (reused)"] = 0.0
    run.load_avg["start"] = [round(x, 2) for x in os.getloadavg()]
    ensure_ray()
    stages = [("train", stage_train), ("generate", stage_generate), ("evaluate", stage_evaluate)]
    if args.model:  # score an exported checkpoint of RUN's training
        import yaml

        from sdray.train.metrics import read_metrics

        step = yaml.safe_load((Path(args.model) / "sdray_train.yaml").read_text())["step"]
        history = [r for r in read_metrics(str(source / "train")) if r["step"] <= step]
        run.results.unet = UnetResult(steps=step, model=str(Path(args.model).absolute()),
                                      final_loss=history[-1]["loss"], history=history)  # fmt: skip
        stages = stages[1:]
    for name, stage in stages:
        start = time.perf_counter()
        stage(run)
        run.stage_s[name] = round(time.perf_counter() - start, 1)
        print(f"{name} done in {run.stage_s[name]:.1f} s", flush=True)
    run.load_avg["end"] = [round(x, 2) for x in os.getloadavg()]
    report = write_report(run, run.out / "report")
    metrics = json.loads((report / "metrics.json").read_text()) | {"overrides": args.overrides}
    print(json.dumps(metrics["faithfulness"]["generated"], indent=1))
    if args.name:
        target = Path(__file__).parent / "results" / f"demo_variant_{args.name}.json"
        target.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
