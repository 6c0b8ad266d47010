"""GPU-hours to encode N images and to train S steps, from the FLOP counts in results/flops_sd15.json.

    .venv/bin/python benchmarks/sizing.py   # prints the Markdown tables of docs/cluster.md

These are ESTIMATES: measured FLOPs per 512px image (SD 1.5's architecture, counted by torch's flop counter)
divided by an ASSUMED sustained throughput = peak dense bf16 tensor FLOP/s x model FLOP utilisation (MFU).
The peaks are the vendors' published dense (no sparsity) bf16 numbers; the MFUs are assumptions, not
measurements (no GPU was available here). Measure yours with benchmarks/train_throughput.py on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

FLOPS = Path(__file__).resolve().parent / "results" / "flops_sd15.json"

GPUS = {"A100": 312e12, "H100 SXM": 989e12}
"""Peak dense bf16 tensor-core FLOP/s (published specs, no sparsity)."""
MFU = {"encode": 0.30, "train": 0.35}
"""Assumed model FLOP utilisation: VAE convolutions at 512px (encode), UNet forward+backward (train)."""


def gpu_hours(tflop_per_image: float, images: float, peak: float, mfu: float) -> float:
    return tflop_per_image * 1e12 * images / (peak * mfu) / 3600


def tables(flops: dict[str, float]) -> str:
    encode = flops["vae_encode_tflop"] + flops["text_encode_tflop"]
    train = flops["train_step_tflop"]
    head = "| | " + " | ".join(f"{g} GPU-h" for g in GPUS) + " |\n|---|" + "---:|" * len(GPUS) + "\n"
    lines = [
        f"Encode (stage 1): {encode:.3f} TFLOP per image (VAE encode + text encoder), MFU {MFU['encode']:.0%}\n",
        head.replace("| |", "| images |", 1),
    ]
    for n in (1e6, 1e7, 1e8):
        cells = [f"{gpu_hours(encode, n, p, MFU['encode']):,.1f}" for p in GPUS.values()]
        lines.append(f"| {n:,.0f} | " + " | ".join(cells) + " |\n")
    lines += [
        f"\nTrain (stage 2): {train:.3f} TFLOP per image per step (UNet forward + backward), "
        f"MFU {MFU['train']:.0%}; global batch 256\n",
        head.replace("| |", "| steps |", 1),
    ]
    for steps in (1e4, 1e5, 5e5):
        cells = [f"{gpu_hours(train, steps * 256, p, MFU['train']):,.0f}" for p in GPUS.values()]
        lines.append(f"| {steps:,.0f} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


if __name__ == "__main__":
    print(tables(json.loads(FLOPS.read_text())))
