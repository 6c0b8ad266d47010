"""Count FLOPs per 512x512 image for SD 1.5's components on the meta device (no weights, no compute).

    .venv/bin/python benchmarks/flops.py   # writes benchmarks/results/flops_sd15.json

The sizing tables in docs/cluster.md are computed from these counts by benchmarks/sizing.py.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from sdray.models.presets import SD15

RESULTS = Path(__file__).resolve().parent / "results" / "flops_sd15.json"


def _count(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e12


def measure() -> dict[str, float]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15["unet"])
        vae = AutoencoderKL(**SD15["vae"])
        text = CLIPTextModel(CLIPTextConfig(**SD15["text_encoder"]))
        latents = torch.randn(1, 4, 64, 64)
        image = torch.randn(1, 3, 512, 512)
        embeds = torch.randn(1, 77, 768)
        ids = torch.zeros(1, 77, dtype=torch.long)
        t = torch.tensor([500])
    with torch.no_grad():
        out = {
            "unet_forward_tflop": _count(lambda: unet(latents, t, embeds)),
            "vae_encode_tflop": _count(lambda: vae.encode(image)),
            "vae_decode_tflop": _count(lambda: vae.decode(latents)),
            "text_encode_tflop": _count(lambda: text(ids)),
        }
    out["train_step_tflop"] = 3 * out["unet_forward_tflop"]  # forward + backward ~ 3x forward
    out["sample_50_steps_cfg_tflop"] = 100 * out["unet_forward_tflop"] + out["vae_decode_tflop"]
    return out


if __name__ == "__main__":
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'} (meta device: counts only)",
        "torch": torch.__version__,
        **{k: round(v, 4) for k, v in measure().items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
