"""`sdray demo`: every stage on the synthetic data set, then a report that measures what the model learned.

synth data -> train VAE -> assemble model dir -> preprocess (Ray Data) -> train UNet (Ray Train) -> export
-> sample held-out and seen prompts with the exported model -> caption faithfulness -> report directory.
Each stage is one library call of its own package; this module only wires paths and times the stages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sdray.cluster import ensure_ray
from sdray.demo.config import QUICK_OVERRIDES, DemoOptions
from sdray.demo.report import write_report
from sdray.demo.results import DataResult, DemoRun, GenerateResult, UnetResult, VaeResult
from sdray.errors import ConfigError
from sdray.models.config import ModelConfig
from sdray.pipeline_config import PipelineConfig, load_pipeline_config

log = logging.getLogger(__name__)
T = TypeVar("T")

REPORT_DIR = "report"


def demo_config(config: str, overrides: list[str], *, quick: bool) -> PipelineConfig:
    """The pipeline config of the demo: ``config`` (default `demo`), quick overrides, then the user's."""
    return load_pipeline_config(config, [*(QUICK_OVERRIDES if quick else ()), *overrides])


def prepare_output(opts: DemoOptions) -> Path:
    """The absolute run directory, emptied with ``overwrite``; a non-empty one is refused otherwise so that a
    rerun never mixes its outputs with stale ones."""
    out = Path(opts.output).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not opts.overwrite:
            raise ConfigError(f"{out} already exists and is not empty: pass --overwrite to replace it")
        looks_like_run = out.is_dir() and any((out / name).exists() for name in (REPORT_DIR, "data"))
        if not looks_like_run:
            raise ConfigError(f"{out} does not look like a demo run directory; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_at(model: ModelConfig, path: Path | str) -> ModelConfig:
    """The model config that loads ``path`` (a saved architecture: the preset's size overrides must go)."""
    return dataclasses.replace(model, path=str(path), unet={}, vae={}, text_encoder={}, scheduler={})


def stage_data(run: DemoRun) -> None:
    from sdray.data.synth import write_synth

    write_synth(run.cfg.synth, run.out / "data")
    run.results.data = DataResult(images=run.cfg.synth.num_images, held_out=run.cfg.synth.held_out)


def stage_vae(run: DemoRun) -> None:
    from sdray.vae.export import assemble_model_dir
    from sdray.vae.train import train_vae

    vae_cfg = dataclasses.replace(run.cfg.vae_train, data=str(run.out / "data"), output=str(run.out / "vae"))
    result = train_vae(vae_cfg, run.cfg.model, run.cfg.tracking)
    assemble_model_dir(result.vae_dir, run.cfg.model, run.out / "model")
    run.results.vae = VaeResult(
        psnr_db=result.psnr,
        steps=result.steps,
        train_seconds=result.train_seconds,
        scaling_factor=result.scaling_factor,
        history=result.history,
    )


def stage_preprocess(run: DemoRun) -> None:
    from sdray.preprocess.run import run_preprocess

    pre = dataclasses.replace(run.cfg.preprocess, input=str(run.out / "data"), output=str(run.out / "cache"))
    summary = run_preprocess(
        dataclasses.replace(run.cfg, model=model_at(run.cfg.model, run.out / "model"), preprocess=pre)
    )
    run.results.preprocess = summary


def stage_train(run: DemoRun) -> None:
    from sdray.train.metrics import read_metrics
    from sdray.train.run import run_training

    train_cfg = dataclasses.replace(run.cfg.train, data=str(run.out / "cache"), output=str(run.out / "train"))
    result = run_training(train_cfg, model_at(run.cfg.model, run.out / "model"), run.cfg.tracking)
    if result.model is None:
        raise ConfigError("UNet training exported no model: the demo needs train.export: true")
    history = read_metrics(result.output)
    run.results.unet = UnetResult(
        steps=result.step,
        model=result.model,
        final_loss=history[-1]["loss"] if history else None,
        history=[{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in history],
    )


def stage_generate(run: DemoRun) -> None:
    from PIL import Image

    from sdray.evaluate import evaluation_prompts
    from sdray.evaluate.report import write_samples
    from sdray.models.components import load_components
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    opts = run.opts
    model_dir = _done(run.results.unet, "train").model
    sampler = Sampler(load_components(model_at(run.cfg.model, model_dir)), source=model_dir)
    prompts = evaluation_prompts(run.cfg.synth, per_combination=opts.samples_per_prompt)
    prompts = prompts[: opts.max_images or None]  # held-out combinations come first
    native = sampler.info.native_size
    sizes = sampler.info.buckets or ((native, native),)  # a bucketed model: every prompt at every bucket
    requests = [
        GenerationRequest(
            prompt, (opts.seed + i,), w, h, opts.sampler_steps, opts.guidance_scale, opts.scheduler
        )
        for h, w in sizes
        for i, (prompt, _) in enumerate(prompts)
    ]
    arrays = sampler.generate(requests, max_batch=opts.max_batch)
    images = [Image.fromarray((a[0] * 255).round().astype("uint8")) for a in arrays]
    prompts = prompts * len(sizes)
    write_samples(run.out / "samples", images, [p for p, _ in prompts])
    labels = [f"{r.width}x{r.height}" for r in requests]
    run.results.generate = GenerateResult(images=images, prompts=prompts, sizes=labels)


def stage_evaluate(run: DemoRun) -> None:
    from sdray.evaluate import faithfulness
    from sdray.evaluate.attributes import recover
    from sdray.evaluate.faithfulness import score
    from sdray.evaluate.report import read_real, write_evaluation

    generated = _done(run.results.generate, "generate")
    images, prompts = generated.images, generated.prompts
    real_images, _, real_targets = read_real(run.out / "data", run.opts.num_real)
    targets = [t for _, t in prompts]
    held_out = run.cfg.synth.held_out_combinations()
    metrics = faithfulness(
        images,
        targets,
        held_out=held_out,
        real=(real_images, real_targets),
        seed=run.opts.seed,
    )
    sizes = generated.sizes
    if len(set(sizes)) > 1:  # the bucketed demo: the generated images scored per size (WxH) as well
        metrics["generated_by_size"] = {
            size: score([recover(images[i]) for i in idx], [targets[i] for i in idx], held_out=held_out)
            for size in sorted(set(sizes))
            for idx in [[i for i, s in enumerate(sizes) if s == size]]
        }
    write_evaluation(run.out / "eval", metrics, images, [p for p, _ in prompts], targets,
                     grid_images=run.opts.grid_images)  # fmt: skip
    run.results.faithfulness = metrics


STAGES: tuple[tuple[str, Callable[[DemoRun], None]], ...] = (
    ("data", stage_data),
    ("vae", stage_vae),
    ("preprocess", stage_preprocess),
    ("train", stage_train),
    ("generate", stage_generate),
    ("evaluate", stage_evaluate),
)


def run_demo(
    opts: DemoOptions,
    cfg: PipelineConfig,
    *,
    progress: Callable[[str], None] = log.info,
) -> Path:
    """Run every stage into ``opts.output`` and write the report; returns the report directory.

    ``progress`` receives one line when a stage starts and one when it ends (with its wall time).
    """
    opts = opts.effective()
    run = DemoRun(out=prepare_output(opts), cfg=cfg, opts=opts)
    run.load_avg["start"] = [round(x, 2) for x in os.getloadavg()]
    ensure_ray()
    run_stages(run, [name for name, _ in STAGES], progress=progress)
    run.load_avg["end"] = [round(x, 2) for x in os.getloadavg()]
    return write_report(run, run.out / REPORT_DIR)


def run_stages(run: DemoRun, names: Sequence[str], *, progress: Callable[[str], None] = log.info) -> None:
    """Run the stages ``names`` (of STAGES) in that order on ``run``, timing each into ``run.stage_s``.

    `run_demo` runs all of them; a benchmark may run a subset on a prepared run directory (e.g. reuse a VAE).
    """
    by_name = dict(STAGES)
    for index, name in enumerate(names, start=1):
        progress(f"[{index}/{len(names)}] {name} ...")
        start = time.perf_counter()
        by_name[name](run)
        run.stage_s[name] = round(time.perf_counter() - start, 2)
        progress(f"[{index}/{len(names)}] {name} done in {run.stage_s[name]:.1f} s{_stage_note(run, name)}")


def _stage_note(run: DemoRun, name: str) -> str:
    if name == "vae" and run.results.vae:
        vae = run.results.vae
        return f": held-out PSNR {vae.psnr_db:.2f} dB after {vae.steps} steps"
    if name == "train" and run.results.unet:
        unet = run.results.unet
        return f": {unet.steps} steps, final loss {unet.final_loss:.4f}"
    if name == "evaluate" and run.results.faithfulness:
        acc = run.results.faithfulness["generated"]["held_out"]
        if acc.get("n"):
            return f": held-out colour {acc['color']:.2f} shape {acc['shape']:.2f} position {acc['position']:.2f}"
    return ""


def _done(result: T | None, stage: str) -> T:
    if result is None:
        raise RuntimeError(f"the demo's {stage} stage has not run")
    return result
