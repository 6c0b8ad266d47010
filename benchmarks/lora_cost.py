"""What LoRA costs and saves against full fine-tuning of the same UNet on the same batch.

    .venv/bin/python benchmarks/lora_cost.py --preset tiny --resolution 64 --batch 8 --steps 5 --rounds 3
    .venv/bin/python benchmarks/lora_cost.py --preset sd15 --resolution 128 --batch 1 --steps 2 --rounds 1

Both variants are built by sdray's own `build_state` (AdamW over the parameters that train; `--ema` adds the
EMA) and step through the real loss (`prepare_batch`, `draw_noise`, `diffusion_loss`) on one fixed random
batch of cached-latent shape. Each (variant, round) runs in a fresh process, alternating full / lora, so a
process's peak memory is its own: CUDA `max_memory_allocated` on a GPU, else the peak resident set size
(ru_maxrss) minus the size after the UNet was built. Reported: adapter file size (the exported
`pytorch_lora_weights.safetensors`) vs the UNet's fp32 weights, trainable parameters, median step time (CPU
seconds of the process and wall seconds) and peak training memory. sd15 is SD 1.5's architecture with random
weights: shapes and memory, not quality. Results go to benchmarks/results/lora_cost_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _batch(preset: str, resolution: int, batch: int):
    """A random batch in the cache's layout, sized from the preset (4 latent channels, /8, 77 tokens)."""
    from sdray.data import cache
    from sdray.models.presets import PRESETS

    width = PRESETS[preset]["unet"]["cross_attention_dim"]
    info = cache.CacheInfo(
        vae_scaling_factor=0.18215,
        encoder_fingerprint="",
        resolution=resolution,
        latent_shape=(4, resolution // 8, resolution // 8),
        text_embeds_shape=(77, width),
    )
    gen = torch.Generator().manual_seed(0)
    raw = {
        cache.LATENT: torch.randn(batch, 4 * (resolution // 8) ** 2, generator=gen).half(),
        cache.TEXT_EMBEDS: torch.randn(batch, 77 * width, generator=gen).half(),
    }
    return info, raw


def _peak_mb(device: torch.device, baseline_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024  # Linux: KiB


def measure(args: argparse.Namespace, lora: bool) -> dict:
    """One variant in this (fresh) process: build, warm up, time ``args.steps`` steps."""
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.train.config import LoraConfig, TrainConfig
    from sdray.train.loss import diffusion_loss, draw_noise, prepare_batch
    from sdray.train.state import build_state

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(preset=args.preset)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = TrainConfig(ema=args.ema, lora=LoraConfig(enabled=lora, rank=args.rank))
    state = build_state(cfg, model_cfg, device, rank=0)
    built_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scheduler = load_components(model_cfg, ["scheduler"]).scheduler
    info, raw = _batch(args.preset, args.resolution, args.batch)
    raw = {k: v.to(device) for k, v in raw.items()}
    loss_cfg = cfg.loss.resolve(scheduler.config)
    empty = torch.zeros(info.text_embeds_shape, device=device)

    def step() -> None:
        batch = prepare_batch(raw, info, empty, loss_cfg, state.generator)
        draw = draw_noise(batch.latents, scheduler, loss_cfg, state.generator)
        diffusion_loss(state.unet, scheduler, batch, loss_cfg, draw).backward()
        torch.nn.utils.clip_grad_norm_(state.params, 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.step(state.params)

    step()  # warm-up: allocates gradients and optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = {
        "step_wall_s": (time.perf_counter() - wall) / args.steps,
        "step_cpu_s": (time.process_time() - cpu) / args.steps,
        "peak_train_mb": _peak_mb(device, built_kb if device.type == "cpu" else baseline_kb),
        "trainable_params": sum(p.numel() for p in state.params),
        "unet_params": sum(p.numel() for p in state.unet.parameters()),
        "device": str(device),
    }
    if lora:
        result.update(_sizes(state.unet))
    return result


def _sizes(unet: torch.nn.Module) -> dict:
    """Exported adapter file size, and the UNet's fp32 weight bytes (its safetensors file less the header)."""
    from sdray.models.lora import WEIGHTS_FILE
    from sdray.train.lora import save_lora_dir

    base = sum(v.numel() * 4 for k, v in unet.state_dict().items() if ".lora_" not in k)
    with tempfile.TemporaryDirectory() as tmp:
        size = (save_lora_dir(unet, Path(tmp)) / WEIGHTS_FILE).stat().st_size
    return {"adapter_file_bytes": size, "unet_weight_bytes": base}


def _child(args: argparse.Namespace, lora: bool, queue: mp.Queue) -> None:
    queue.put(measure(args, lora))


def run(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process per measurement: its own peak memory
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for name in ("full", "lora"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(args, name == "lora", queue))
            proc.start()
            runs[name].append(queue.get())
            proc.join()
    summary = {name: _median(rows) for name, rows in runs.items()}
    lora, full = summary["lora"], summary["full"]
    return {
        "preset": args.preset,
        "resolution": args.resolution,
        "batch": args.batch,
        "rank": args.rank,
        "ema": args.ema,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores, {full['device']}",
        "full": full,
        "lora": lora,
        "adapter_vs_unet_size": lora["adapter_file_bytes"] / lora["unet_weight_bytes"],
        "trainable_fraction": lora["trainable_params"] / full["trainable_params"],
        "step_cpu_ratio_lora_over_full": lora["step_cpu_s"] / full["step_cpu_s"],
        "peak_memory_ratio_lora_over_full": lora["peak_train_mb"] / full["peak_train_mb"],
        "note": args.note,
    }


def _median(rows: list[dict]) -> dict:
    return {
        k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], float) else rows[0][k]
        for k in rows[0]
    }


def markdown(r: dict) -> str:
    full, lora = r["full"], r["lora"]
    return "\n".join(
        [
            f"# LoRA vs full fine-tuning: {r['preset']} at {r['resolution']} px, batch {r['batch']}, rank {r['rank']}",
            "",
            f"{r['machine']}; {r['rounds']} round(s) of {r['steps']} steps per variant, {r['threads']} torch "
            f"thread(s), EMA {'on' if r['ema'] else 'off'}. {r['note']}",
            "",
            "| | full | LoRA | LoRA / full |",
            "|---|---|---|---|",
            f"| trainable parameters | {full['trainable_params']:,} | {lora['trainable_params']:,} "
            f"| {r['trainable_fraction']:.4%} |",
            f"| step, CPU s (median) | {full['step_cpu_s']:.3f} | {lora['step_cpu_s']:.3f} "
            f"| {r['step_cpu_ratio_lora_over_full']:.2f} |",
            f"| step, wall s (median) | {full['step_wall_s']:.3f} | {lora['step_wall_s']:.3f} "
            f"| {lora['step_wall_s'] / full['step_wall_s']:.2f} |",
            f"| peak training memory, MB | {full['peak_train_mb']:.0f} | {lora['peak_train_mb']:.0f} "
            f"| {r['peak_memory_ratio_lora_over_full']:.2f} |",
            f"| file: UNet fp32 weights vs adapter | {lora['unet_weight_bytes']:,} B | "
            f"{lora['adapter_file_bytes']:,} B | {r['adapter_vs_unet_size']:.2%} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the trained parameters too")
    parser.add_argument("--note", default="", help="free text saved with the result (e.g. machine load)")
    args = parser.parse_args()
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"lora_cost_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
