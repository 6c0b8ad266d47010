"""Training throughput on cached latents versus encoding online (VAE + text encoder every step).

    .venv/bin/python benchmarks/train_throughput.py --preset tiny --resolution 64 --batch 8 --rounds 5
    .venv/bin/python benchmarks/train_throughput.py --preset sd15 --resolution 128 --batch 1 --rounds 2 --optimizer sgd
    .venv/bin/python benchmarks/train_throughput.py --ray-steps 60     # data-wait fraction through Ray Train

The two variants run in one process on the same model and data, in alternating rounds (so machine noise hits
both alike): `cached` = the loss on stored latents/embeddings (what `sdray train` does); `online` = the same
loss after `vae.encode` + `text_encoder` of the batch under no_grad (what a training script without the cache
does). `--ray-steps` runs the real Ray Train loop on a tiny cache and reports how much of each step waited for
data. Results are appended to benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdray.data import cache
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.train.config import LossConfig, TrainConfig
from sdray.train.loss import diffusion_loss, draw_noise, prepare_batch

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def _inputs(parts, batch: int, resolution: int):
    tokens = parts.tokenizer(
        ["a large red circle in the top left"] * batch,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    with torch.no_grad():
        latents = parts.vae.encode(pixels).latent_dist.mean  # (B, 4, h, w)
        text = parts.text_encoder(tokens).last_hidden_state  # (B, 77, D)
    info = cache.CacheInfo(
        vae_scaling_factor=parts.vae_scaling_factor,
        encoder_fingerprint="",
        resolution=resolution,
        latent_shape=tuple(latents.shape[1:]),
        text_embeds_shape=tuple(text.shape[1:]),
    )
    raw = {cache.LATENT: latents.flatten(1).half(), cache.TEXT_EMBEDS: text.flatten(1).half()}
    return info, raw, pixels, tokens


def _step(parts, optimizer, raw, info, generator, loss_cfg):
    empty = torch.zeros(info.text_embeds_shape)
    batch = prepare_batch(raw, info, empty, loss_cfg, generator)
    loss = diffusion_loss(
        parts.unet,
        parts.scheduler,
        batch,
        loss_cfg,
        draw_noise(batch.latents, parts.scheduler, loss_cfg, generator),
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compare(args: argparse.Namespace) -> dict:
    preset, resolution, batch, rounds, steps = (
        args.preset,
        args.resolution,
        args.batch,
        args.rounds,
        args.steps,
    )
    parts = load_components(ModelConfig(preset=preset))
    parts.unet.train()
    # SGD keeps an sd15 run within a small machine's memory (AdamW adds two fp32 copies of 860M weights)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = opt_cls(parts.unet.parameters(), lr=1e-5)
    info, raw, pixels, tokens = _inputs(parts, batch, resolution)
    loss_cfg = LossConfig().resolve(parts.scheduler.config)
    generator = torch.Generator().manual_seed(0)

    def cached():
        _step(parts, optimizer, raw, info, generator, loss_cfg)

    def online():
        with torch.no_grad():  # the frozen encoders, run on every step
            latents = parts.vae.encode(pixels).latent_dist.sample(generator)
            text = parts.text_encoder(tokens).last_hidden_state
        fresh = {cache.LATENT: latents.flatten(1).half(), cache.TEXT_EMBEDS: text.flatten(1).half()}
        _step(parts, optimizer, fresh, info, generator, loss_cfg)

    cached(), online()  # warm-up
    wall: dict[str, list[float]] = {"cached": [], "online": []}
    cpu: dict[str, list[float]] = {"cached": [], "online": []}
    for _ in range(rounds):
        for name, fn in (("cached", cached), ("online", online)):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - start_cpu) / steps)
    # CPU seconds of this process: robust on a shared machine where other work steals the cores
    cached_s, online_s = statistics.median(cpu["cached"]), statistics.median(cpu["online"])
    cached_wall, online_wall = statistics.median(wall["cached"]), statistics.median(wall["online"])
    return {
        "preset": preset,
        "resolution": resolution,
        "batch": batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "optimizer": args.optimizer,
        "cached_samples_per_cpu_s": batch / cached_s,
        "online_samples_per_cpu_s": batch / online_s,
        "speedup_cached_over_online": online_s / cached_s,
        "cached_samples_per_wall_s": batch / cached_wall,
        "online_samples_per_wall_s": batch / online_wall,
        "speedup_wall": online_wall / cached_wall,
    }


def ray_data_wait(steps: int) -> dict:
    """Median and mean data-wait fraction of the real Ray Train loop (1 worker, tiny preset, 64 px)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from cache_fixtures import write_test_cache

    from sdray.train.metrics import read_metrics
    from sdray.train.run import run_training

    with tempfile.TemporaryDirectory() as tmp:
        data = write_test_cache(
            Path(tmp) / "cache", load_components(ModelConfig()), num_rows=256, rows_per_shard=64
        )
        cfg = TrainConfig(
            data=str(data),
            output=f"{tmp}/run",
            batch_size=8,
            max_steps=steps,
            log_every=10,
            checkpoint_every=steps,
            validate_every=-1,
            export=False,
        )
        run_training(cfg, ModelConfig())
        rows = read_metrics(cfg.output)[1:]  # step 1 includes starting the read tasks
    fracs = [r["data_wait_frac"] for r in rows]
    return {
        "ray_steps": steps,
        "data_wait_frac_median": statistics.median(fracs),
        "data_wait_frac_mean": statistics.mean(fracs),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--ray-steps", type=int, default=0, help="run the Ray Train loop instead (data wait)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: CPU time equals the work, whatever else runs on the machine
    result = ray_data_wait(args.ray_steps) if args.ray_steps else compare(args)
    result.update(
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    print(json.dumps(result, indent=2))
    history = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps([*history, result], indent=2) + "\n")


if __name__ == "__main__":
    main()
