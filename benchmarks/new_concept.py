"""A new concept is learned and nothing else is forgotten: LoRA and full fine-tuning, prior preservation off/on.

    PYTHONPATH=. .venv/bin/python benchmarks/new_concept.py                   # ~35 min on an idle 2-core CPU
    PYTHONPATH=. .venv/bin/python benchmarks/new_concept.py --reuse-base      # keep runs/concept/base
    PYTHONPATH=. .venv/bin/python benchmarks/new_concept.py --quick --new-images 32 --steps 4 --per-combination 1
        # smoke run (quick demo as base, ~4 min), writes no result

1. base: the demo's stages (`sdray demo`, pipelines/configs/demo.yaml): the VAE on scenes of every colour
   (a pretrained VAE reconstructs anything), then latents and the UNet on scenes that never show the new
   colour (`synth.colors` without it).
2. new scenes: `--new-images` scenes of the new colour (every shape and position), preprocessed with the
   base model's encoders.
3. prior preservation (DreamBooth's loss, https://arxiv.org/abs/2208.12242): the base model's own images of
   the old prompts, made by `batch-generate` and preprocessed the same way, are `train.class_data`; every
   batch of new scenes is paired with a batch of them (loss: new MSE + train.prior_loss_weight x class MSE).
4. four fine-tunes of the base on the new scenes, the same steps and batch: LoRA (rank 4) and full
   fine-tuning, each with prior preservation off and on.
5. the base and each fine-tune sample every old and every new (colour, shape, position) prompt with the same
   seeds, and the evaluator reads colour, shape and position back from the pixels.

Reported: the new colour's accuracy on new prompts (goal >= 0.8 after; near 0 before), and colour / shape /
position on old prompts before and after (goal: no drop over 0.05). Results: benchmarks/results/
new_concept.{json,md}, with the machine, the load average and this command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sdray.demo.run import model_at

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLING = {"steps": 25, "guidance_scale": 2.0, "scheduler": "ddim"}  # the demo's own (sdray/demo/config.py)
EVAL_SEED, CLASS_SEED = 0, 100_000  # class images never share a seed with an evaluated image
ATTRS = ("color", "shape", "position", "all")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    lora: bool
    prior: bool

    @property
    def label(self) -> str:
        return f"{'LoRA r4' if self.lora else 'full'}, prior preservation {'on' if self.prior else 'off'}"


VARIANTS = (
    Variant("lora", lora=True, prior=False),
    Variant("lora_prior", lora=True, prior=True),
    Variant("full", lora=False, prior=False),
    Variant("full_prior", lora=False, prior=True),
)


def base_run(cfg_all, cfg_old, out: Path, *, reuse: bool, quick: bool) -> Path:
    """Train the base model with the demo's stages; returns its exported model directory.

    The VAE trains on scenes of every colour and the UNet on scenes without the new one. A pretrained VAE
    reconstructs any image; the concept is new to the UNet and its captions. (A demo VAE that never saw the
    new colour decodes it as another colour, and then no UNet fine-tune can draw it: measured, magenta came
    back yellow.)
    """
    from sdray.demo import DemoOptions
    from sdray.demo import run as stages
    from sdray.demo.report import write_report
    from sdray.demo.results import DemoRun

    model = out / "train" / "model"
    if reuse and model.is_dir():
        return model
    opts = DemoOptions(output=str(out), overwrite=True, quick=quick).effective()
    run = DemoRun(out=stages.prepare_output(opts), cfg=cfg_all, opts=opts)
    stages.run_stages(run, ["data", "vae"], progress=print)
    shutil.rmtree(out / "data")
    run.cfg = cfg_old
    stages.run_stages(run, ["data", "preprocess", "train", "generate", "evaluate"], progress=print)
    write_report(run, out / stages.REPORT_DIR)
    return model


def preprocess(cfg, model: Path, data: Path, cache: Path) -> dict:
    from sdray.preprocess.run import run_preprocess

    pre = dataclasses.replace(cfg.preprocess, input=str(data), output=str(cache))
    return run_preprocess(dataclasses.replace(cfg, model=model_at(cfg.model, model), preprocess=pre))


def class_images(cfg, model: Path, prompts: list[str], work: Path) -> Path:
    """The base model's images of the old prompts, through `batch-generate`, as a latent cache."""
    from sdray.batchgen.run import run_batch_generate

    work.mkdir(parents=True, exist_ok=True)
    prompt_file = work / "class_prompts.jsonl"
    rows = [{"prompt": p, "seed": CLASS_SEED + i} for i, p in enumerate(prompts)]
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = dataclasses.replace(
        cfg.batch_generate,
        prompts=str(prompt_file),
        output=str(work / "class_images"),
        concurrency=2,
        **SAMPLING,
    )
    run_batch_generate(dataclasses.replace(cfg, model=model_at(cfg.model, model), batch_generate=gen))
    preprocess(cfg, model, work / "class_images", work / "class_cache")
    return work / "class_cache"


def fine_tune(cfg, model: Path, new_cache: Path, class_cache: Path, variant: Variant, args, out: Path):
    from sdray.train.run import run_training

    train = dataclasses.replace(
        cfg.train,
        data=str(new_cache),
        output=str(out),
        max_steps=args.steps,
        warmup_steps=args.steps // 10,
        learning_rate=args.lora_lr if variant.lora else args.full_lr,
        checkpoint_every=args.steps,
        class_data=str(class_cache) if variant.prior else "",
        prior_loss_weight=args.prior_loss_weight,
        lora=dataclasses.replace(cfg.train.lora, enabled=variant.lora, rank=4),
    )
    return run_training(train, model_at(cfg.model, model), cfg.tracking)


def evaluate(model: Path, lora: str | None, prompt_sets: dict[str, list], held_out: list) -> dict[str, Any]:
    """Sample every prompt of each set (seed = EVAL_SEED + index) and score what the pixels show."""
    from sdray.evaluate.attributes import recover
    from sdray.evaluate.faithfulness import score
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.models.lora import LoraSpec
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    sampler = Sampler(
        load_components(ModelConfig(path=str(model))),
        source=str(model),
        loras=[LoraSpec(path=lora)] if lora else (),
    )
    side = sampler.info.native_size
    scores = {}
    for name, prompts in prompt_sets.items():
        steps, guidance, scheduler = SAMPLING.values()
        requests = [
            GenerationRequest(p, (EVAL_SEED + i,), side, side, steps, guidance, scheduler)
            for i, (p, _) in enumerate(prompts)
        ]
        arrays = sampler.generate(requests, max_batch=16)
        recovered = [recover(a[0]) for a in arrays]  # (H, W, 3) floats in [0, 1]
        scores[name] = score(recovered, [t for _, t in prompts], held_out=held_out)["all"]
    return scores


def run_settings(args, variant: Variant) -> tuple[dict[str, float], dict[str, float]]:
    """(what a fine-tune ran with, the defaults); a setting off its default names the result."""
    defaults = {"lr": 1e-3 if variant.lora else 2e-4, "steps": 300, "prior_loss_weight": 1.0}
    settings = {
        "lr": args.lora_lr if variant.lora else args.full_lr,
        "steps": args.steps,
        "prior_loss_weight": args.prior_loss_weight if variant.prior else 1.0,
    }
    return settings, defaults


def results_command() -> str:
    return " ".join(["benchmarks/new_concept.py", *sys.argv[1:]])


def table(results: dict) -> list[str]:
    rows = results["models"]
    before = rows["base"]["old"]
    lines = [
        "| model | new colour on new prompts | old: colour | shape | position | all | largest old drop |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        old = row["old"]
        drop = max(before[a] - old[a] for a in ATTRS)
        cells = [f"{old[a]:.2f}" for a in ATTRS]
        lines.append(f"| {row['label']} | {row['new']['color']:.2f} | {' | '.join(cells)} | {drop:+.2f} |")
    return lines


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "new_concept.json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["setup"]
    lines = [
        "# A new concept learned, nothing else forgotten (`benchmarks/new_concept.py`)",
        "",
        f"`{results['command']}` on {results['machine']}; load average (1, 5, 15 min) "
        f"{results['load_avg_start']} at start, {results['load_avg_end']} at end; {results['wall_s']:.0f} s.",
        "",
        f"Base: the demo's VAE (every colour), then its UNet ({s['base_images']} scenes, {s['base_steps']} "
        f"steps) on scenes without {s['new_color']}. "
        f"Fine-tunes: {s['new_images']} {s['new_color']} scenes, {s['steps']} steps of "
        f"{s['batch']} ({s['workers']} workers); LoRA lr {s['lora_lr']}, full lr {s['full_lr']}; prior "
        f"preservation: {s['class_images']} base-model images of the old prompts, prior_loss_weight "
        f"{s['prior_loss_weight']}. Scored: {s['old_prompts']} old and {s['new_prompts']} new prompts, "
        f"{SAMPLING['steps']} DDIM steps, guidance {SAMPLING['guidance_scale']}, the same seeds for every model.",
        "",
        "Goals: new colour >= 0.80; no old attribute drops by more than 0.05 (the last column: the largest",
        "drop of colour/shape/position/all against the base; negative = better than the base).",
        "",
        *table(results),
        "",
        *[f"Rows added later from the same base: `{command}`." for command in results.get("appended", [])],
        "",
    ]
    (RESULTS / "new_concept.md").write_text("\n".join(lines))


def main() -> None:  # noqa: PLR0915 - one linear experiment, kept in order
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default="runs/concept", help="work directory (base run, caches, fine-tunes)"
    )
    parser.add_argument("--reuse-base", action="store_true", help="keep an existing base run in WORK/base")
    parser.add_argument("--new-color", default="magenta", help="the colour the base never sees")
    parser.add_argument("--new-images", type=int, default=300, help="scenes of the new colour")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every variant")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0, help="train.prior_loss_weight")
    parser.add_argument(
        "--append",
        action="store_true",
        help="with --reuse-base: add these fine-tunes to the committed result (named by their settings)",
    )
    parser.add_argument("--per-combination", type=int, default=4, help="evaluated images per combination")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    parser.add_argument("--quick", action="store_true", help="smoke run: the quick demo as base (no result)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from sdray.cluster import ensure_ray
    from sdray.data.synth import COLORS, SynthConfig, write_synth
    from sdray.demo import demo_config
    from sdray.evaluate import evaluation_prompts

    start, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    work = Path(args.work).absolute()
    old_colors = [c for c in COLORS if c != args.new_color]
    cfg = demo_config("demo", [f"synth.colors=[{','.join(old_colors)}]"], quick=args.quick)
    ensure_ray()
    cfg_all = demo_config("demo", [], quick=args.quick)
    base = base_run(cfg_all, cfg, work / "base", reuse=args.reuse_base, quick=args.quick)
    for name in ("new_data", "new_cache", "prior", *(v.name for v in VARIANTS)):
        shutil.rmtree(work / name, ignore_errors=True)  # everything after the base is redone

    new_synth = SynthConfig(num_images=args.new_images, colors=(args.new_color,), held_out=0, seed=1)
    write_synth(new_synth, work / "new_data", overwrite=True)
    new_cache = work / "new_cache"
    preprocess(cfg, base, work / "new_data", new_cache)

    old_prompts = evaluation_prompts(cfg.synth, per_combination=args.per_combination)
    new_prompts = evaluation_prompts(new_synth, per_combination=args.per_combination)
    class_prompts = [p for p, _ in evaluation_prompts(cfg.synth, per_combination=4)]
    class_cache = class_images(cfg, base, class_prompts, work / "prior")

    prompt_sets = {"old": old_prompts, "new": new_prompts}
    held_out = cfg.synth.held_out_combinations()
    models = {"base": {"label": "base (before)", **evaluate(base, None, prompt_sets, held_out)}}
    print("base", json.dumps(models["base"]), flush=True)
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    for variant in chosen:
        settings, defaults = run_settings(args, variant)
        changed = {k: v for k, v in settings.items() if v != defaults[k]}
        key = "_".join([variant.name, *(f"{k}{v:g}" for k, v in changed.items())])
        t0 = time.perf_counter()
        result = fine_tune(cfg, base, new_cache, class_cache, variant, args, work / variant.name)
        model, lora = (base, result.lora) if variant.lora else (Path(result.model), None)
        scores = evaluate(model, lora, prompt_sets, held_out)
        note = ", ".join(f"{k} {v:g}" for k, v in changed.items())
        models[key] = {
            "label": variant.label + (f" ({note})" if note else ""),
            "settings": settings,
            **scores,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(key, json.dumps(models[key]), flush=True)

    train = cfg.train
    results = {
        "command": results_command(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
        "setup": {
            "new_color": args.new_color,
            "base_images": cfg.synth.num_images,
            "base_steps": train.max_steps,
            "new_images": args.new_images,
            "steps": args.steps,
            "batch": train.batch_size * train.num_workers,
            "workers": train.num_workers,
            "lora_lr": args.lora_lr,
            "full_lr": args.full_lr,
            "class_images": len(class_prompts),
            "prior_loss_weight": train.prior_loss_weight,
            "old_prompts": len(old_prompts),
            "new_prompts": len(new_prompts),
        },
        "models": models,
        "load_avg_start": load_start,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if args.append:
        if not args.reuse_base:
            raise SystemExit(
                "--append needs --reuse-base: the added fine-tunes must start from the same base"
            )
        earlier = json.loads((RESULTS / "new_concept.json").read_text())
        results = {**earlier, "models": {**earlier["models"], **models}}
        results["appended"] = [*earlier.get("appended", []), results_command()]
    if not args.quick:
        write(results)
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
