"""CPU training-step speed options on the demo's models, each alone and side by side in one process.

    .venv/bin/python benchmarks/cpu_step_speed.py                       # demo UNet and VAE, sd15 UNet; 5 rounds
    .venv/bin/python benchmarks/cpu_step_speed.py --rounds 2 --steps 5 --parts unet vae  # quick look

The demo (`pipelines/configs/demo.yaml`) trains a ~1.7M-parameter UNet (2 workers x 1 thread, batch 16 each)
and a small VAE (1 worker x 2 threads, batch 16). At these sizes a step is hundreds of small kernels, so
per-tensor Python work (AdamW's loop over parameters, EMA, gradient clipping) is a real share of it. Options,
each applied alone to a copy of the same model (same weights, same batch) and timed in alternating rounds so
that machine noise hits all alike:

- `baseline`: torch's default AdamW, which on CPU is the per-parameter loop (sdray's before
  `train.fused_adamw`); EMA and clipping per tensor;
- `foreach`: AdamW(foreach=True), EMAModel(foreach=True), clip_grad_norm_(foreach=True) (multi-tensor ops);
- `fused`: AdamW(fused=True) (one fused CPU kernel for the update; sdray's default since 2026-12-04);
- `channels_last`: the model and its input in channels-last memory format;
- `compile`: torch.compile of the model (inductor; compile time reported apart);
- `bf16`: the forward pass and loss under torch.autocast("cpu", dtype=torch.bfloat16) (weights, gradients
  and optimizer state stay fp32; on a CPU with AMX or AVX512-BF16 oneDNN runs the convolutions and matmuls
  in bf16);
- `kept_grads`: gradients zeroed in place after each step (`optimizer.zero_grad(set_to_none=False)`) instead of
  freed (torch's default, sdray's and diffusers' scripts'). Not adopted: on the sd15 UNet at 256 px it was
  0.85x (results/cpu_step_speed_sd15_grads.md): autograd still makes each step's gradient as a new tensor and
  then adds it into the kept one, one more pass over 3.4 GB, so keeping them saves no allocation;
- `threads_interop1`: torch.set_num_interop_threads(1) is process-wide, so it is measured as `--interop 1`
  in a separate run rather than here.

The `sd15` part is the sd15 architecture's UNet (860M parameters, random weights) at `--sd15-resolution` px,
batch 2, 2 threads: one model serves every option there (two copies with AdamW state do not fit in 24 GiB), so
it compares only options that change no weights or optimizer (`baseline`, `bf16`, `kept_grads`), without
EMA; before each round the gradients are put as the round's option leaves them (allocated or freed), so
every timed step is a steady-state one. The `sd15_adamw` part times the AdamW update
alone (clipping included) over the same 860M parameters: `baseline` (torch's default, the per-parameter loop
on a CPU) against `fused` (sdray's `train.fused_adamw`), one optimizer at a time.

The UNet step is sdray's own (`sdray.train.loss`: v-prediction, zero terminal SNR, caption dropout); the VAE
step is `sdray.vae.loss.vae_loss`. Results: benchmarks/results/cpu_step_speed.{json,md} (the machine, load
average at start and end, versions, the command).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from sdray.data import cache
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.precision import autocast, cpu_has_native_bf16
from sdray.train.config import TrainConfig
from sdray.train.loss import diffusion_loss, draw_noise, prepare_batch
from sdray.vae.loss import Autoencode, vae_loss

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = ("baseline", "foreach", "fused", "channels_last", "compile", "bf16", "kept_grads")
PARTS = ("unet", "vae", "sd15", "sd15_adamw")
SD15_OPTIONS = ("baseline", "bf16", "kept_grads")  # options that leave weights and optimizer alone


@dataclass
class Variant:
    """One option applied to its own copy of the model; ``step()`` runs one training step."""

    name: str
    step: Callable[[], float]
    setup_s: float = 0.0
    before_round: Callable[[], None] = lambda: None  # untimed: puts shared state as this option keeps it


def _optimizer(params, option: str, lr: float) -> torch.optim.Optimizer:
    extra = {"foreach": True} if option == "foreach" else {"fused": True} if option == "fused" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, **extra)


def _precision(option: str):
    """sdray's autocast for the `bf16` option (train.mixed_precision: bf16), fp32 otherwise."""
    return autocast("bf16" if option == "bf16" else "no", torch.device("cpu"))


def _prepare(model: torch.nn.Module, option: str) -> torch.nn.Module:
    if option == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if option == "compile":
        return torch.compile(model)
    return model


def _batch_maker(parts, loss_cfg, batch: int, latent_side: int) -> Callable[[torch.Generator], Any]:
    """A function that turns one fixed random (cached-format) batch into a training batch, as the loop does."""
    info = cache.CacheInfo(
        vae_scaling_factor=parts.vae_scaling_factor,
        encoder_fingerprint="",
        resolution=latent_side * parts.vae_downsample,
        latent_shape=(4, latent_side, latent_side),
        text_embeds_shape=(77, parts.text_embed_dim),
    )
    gen = torch.Generator().manual_seed(0)
    raw = {
        cache.LATENT: torch.randn(batch, 4 * latent_side**2, generator=gen).half(),
        cache.TEXT_EMBEDS: torch.randn(batch, 77 * parts.text_embed_dim, generator=gen).half(),
    }
    empty = torch.zeros(info.text_embeds_shape)
    return lambda generator: prepare_batch(raw, info, empty, loss_cfg, generator)


def unet_variants(cfg, parts, batch: int, options: tuple[str, ...]) -> list[Variant]:
    """The demo's UNet step (loss, backward, clip, AdamW, EMA) per option, on the same cached batch."""
    train = cfg.train
    loss_cfg = train.loss.resolve(parts.scheduler.config)
    make_batch = _batch_maker(parts, loss_cfg, batch, latent_side=16)
    variants = []
    for option in options:
        unet = copy.deepcopy(parts.unet).train()
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = _optimizer(params, option, train.learning_rate)
        ema = EMAModel(params, decay=0.9999, foreach=option == "foreach")
        model = _prepare(unet, option)
        step = _unet_step(model, params, optimizer, ema, option, make_batch, parts.scheduler, loss_cfg)
        start = time.perf_counter()
        step()  # warm-up (and, for `compile`, the compilation)
        variants.append(Variant(option, step, time.perf_counter() - start))
    return variants


def sd15_variants(batch: int, resolution: int, options: tuple[str, ...]) -> list[Variant]:
    """The sd15 UNet's step (860M parameters; loss, backward, clip, AdamW) at ``resolution`` px per option.
    One model and optimizer serve every option: a second copy with its AdamW state would not fit in 24 GiB,
    so only options that change no weights or optimizer (SD15_OPTIONS) are compared, and there is no EMA."""
    parts = load_components(ModelConfig(preset="sd15"), ["unet", "vae", "text_encoder", "scheduler"])
    loss_cfg = TrainConfig().loss.resolve(parts.scheduler.config)
    make_batch = _batch_maker(parts, loss_cfg, batch, latent_side=resolution // parts.vae_downsample)
    unet = parts.unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(params, "baseline", 1e-5)
    variants = []
    for option in options:
        step = _unet_step(unet, params, optimizer, None, option, make_batch, parts.scheduler, loss_cfg)
        start = time.perf_counter()
        step()
        variants.append(Variant(option, step, time.perf_counter() - start, _grads_as(option, params)))
    return variants


def _grads_as(option: str, params: list[torch.Tensor]) -> Callable[[], None]:
    """The gradients as ``option``'s steps leave them (the options share one model): allocated and zero for
    `kept_grads`, freed for the others. Each round then times steady-state steps only."""

    def reset() -> None:
        for p in params:
            if option != "kept_grads":
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    return reset


def sd15_adamw_rounds(rounds: int, steps: int) -> dict[str, dict]:
    """The AdamW update alone over the sd15 UNet's 860M parameters (random gradients, clipping included):
    torch's default (the per-parameter loop on a CPU) against the fused kernel (`train.fused_adamw`).

    Two optimizers' state (6.9 GB each) do not fit beside the model in 24 GiB, so each round builds one
    optimizer per implementation in turn, takes one untimed first step (it allocates the state), times
    ``steps`` steps and frees it. Reported like `time_rounds`; `first_step_s` is the median first step.
    """
    unet = load_components(ModelConfig(preset="sd15"), ["unet"]).unet
    params = list(unet.parameters())
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    per_step: dict[str, list[float]] = {"baseline": [], "fused": []}
    first: dict[str, list[float]] = {"baseline": [], "fused": []}
    for _ in range(rounds):
        for name in per_step:
            optimizer = _optimizer(params, name, 1e-5)
            for timings, count in ((first[name], 1), (per_step[name], steps)):
                start = time.perf_counter()
                for _ in range(count):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                timings.append((time.perf_counter() - start) / count)
            del optimizer
    base = statistics.median(per_step["baseline"])
    return {
        name: {
            "s_per_step": round(statistics.median(t), 5),
            "min_s": round(min(t), 5),
            "max_s": round(max(t), 5),
            "speedup": round(base / statistics.median(t), 3),
            "first_step_s": round(statistics.median(first[name]), 2),
        }
        for name, t in per_step.items()
    }


def _unet_step(
    model, params, optimizer, ema, option: str, make_batch, scheduler, loss_cfg
) -> Callable[[], float]:
    """sdray's UNet step (sdray.train.loop.StepRunner without DDP): loss, backward, clip, AdamW, EMA."""
    generator = torch.Generator().manual_seed(1)

    def step() -> float:
        b = make_batch(generator)
        if option == "channels_last":
            b = type(b)(**{**vars(b), "latents": b.latents.contiguous(memory_format=torch.channels_last)})
        noise = draw_noise(b.latents, scheduler, loss_cfg, generator)
        with _precision(option):
            loss = diffusion_loss(model, scheduler, b, loss_cfg, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True if option == "foreach" else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=option != "kept_grads")
        if ema is not None:
            ema.step(params)
        return loss.item()

    return step


def vae_variants(cfg, parts, batch: int, options: tuple[str, ...]) -> list[Variant]:
    """The demo's VAE step (reconstruction + KL loss, backward, AdamW) per option, on the same images."""
    vae_cfg = cfg.vae_train
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    variants = []
    for option in options:
        vae = copy.deepcopy(parts.vae).train()
        optimizer = _optimizer(vae.parameters(), option, vae_cfg.learning_rate)
        model = _prepare(Autoencode(vae), option)
        generator = torch.Generator().manual_seed(1)
        x = images.contiguous(memory_format=torch.channels_last) if option == "channels_last" else images

        def step(model=model, optimizer=optimizer, generator=generator, x=x, option=option):
            with _precision(option):
                loss, _ = vae_loss(model, x, vae_cfg, generator)
            optimizer.zero_grad(set_to_none=option != "kept_grads")
            loss.backward()
            optimizer.step()
            return loss.item()

        start = time.perf_counter()
        step()
        variants.append(Variant(option, step, time.perf_counter() - start))
    return variants


def time_rounds(variants: list[Variant], rounds: int, steps: int) -> dict[str, dict]:
    """Median seconds per step of each variant over ``rounds`` alternating rounds of ``steps`` steps."""
    per_step: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            v.before_round()
            start = time.perf_counter()
            for _ in range(steps):
                v.step()
            per_step[v.name].append((time.perf_counter() - start) / steps)
    base = statistics.median(per_step["baseline"])
    return {
        v.name: {
            "s_per_step": round(statistics.median(per_step[v.name]), 5),
            "min_s": round(min(per_step[v.name]), 5),
            "max_s": round(max(per_step[v.name]), 5),
            "speedup": round(base / statistics.median(per_step[v.name]), 3),
            "first_step_s": round(v.setup_s, 2),
        }
        for v in variants
    }


def markdown(result: dict) -> str:
    lines = [
        f"# CPU training-step options on the demo's models and the sd15 UNet ({result['date']})",
        "",
        f"{result['machine']}; load average {result['load_average_at_start'][0]:.2f} at start, "
        f"{result['load_average_at_end'][0]:.2f} at end; {result['rounds']} alternating rounds of "
        f"{result['steps']} steps ({result.get('sd15_steps', '-')} for sd15), median. "
        f"`{result['command']}`",
        "",
        f"Batch a step: {result['batch']}; sd15 at {result.get('sd15_resolution', '-')} px. "
        f"CPU native bf16 (AVX512-BF16/AMX): {result.get('cpu_native_bf16')}.",
        "",
        "| model | threads | option | s / step | speedup vs baseline | first step s |",
        "|---|---|---|---|---|---|",
    ]
    for part in PARTS:
        for name, r in result.get(part, {}).items():
            lines.append(
                f"| {part} | {result['threads'][part]} | {name} | {r['s_per_step']} | {r['speedup']}x "
                f"| {r['first_step_s']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument(
        "--sd15-steps", type=int, default=2, help="steps per variant per round of the sd15 part"
    )
    parser.add_argument("--sd15-resolution", type=int, default=256, help="pixels of the sd15 part's images")
    parser.add_argument("--interop", type=int, default=0, help="torch interop threads (0: torch's default)")
    parser.add_argument("--out", default="cpu_step_speed", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    if args.interop:
        torch.set_num_interop_threads(args.interop)
    cfg = load_pipeline_config("demo")
    parts = load_components(cfg.model)
    options = tuple(dict.fromkeys(["baseline", *args.options]))
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/cpu_step_speed.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {name: version(name) for name in ("torch", "diffusers")},
        "load_average_at_start": os.getloadavg(),
        "rounds": args.rounds,
        "steps": args.steps,
        "sd15_steps": args.sd15_steps,
        "interop_threads": torch.get_num_interop_threads(),
        "threads": {
            "unet": cfg.train.torch_threads,
            "vae": cfg.vae_train.threads_per_worker,
            "sd15": 2,
            "sd15_adamw": 2,
        },
        "batch": {"unet": cfg.train.batch_size, "vae": cfg.vae_train.batch_size, "sd15": 2},
        "sd15_resolution": args.sd15_resolution,
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    for part in args.parts:
        threads = result["threads"][part]
        torch.set_num_threads(threads)
        if part == "sd15_adamw":
            result[part] = sd15_adamw_rounds(args.rounds, args.sd15_steps)
            print(json.dumps({part: result[part]}, indent=2), flush=True)
            continue
        if part == "sd15":
            precision_only = tuple(o for o in options if o in SD15_OPTIONS)
            variants = sd15_variants(result["batch"][part], args.sd15_resolution, precision_only)
        else:
            build = unet_variants if part == "unet" else vae_variants
            variants = build(cfg, parts, result["batch"][part], options)
        steps = args.sd15_steps if part == "sd15" else args.steps
        result[part] = time_rounds(variants, args.rounds, steps)
        print(json.dumps({part: result[part]}, indent=2), flush=True)
    result["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
