"""Export a training checkpoint as a diffusers-format model directory (safetensors).

sdray export --checkpoint runs/tiny/ray/train/checkpoint-step-00000050 --out runs/tiny-step50
    Writes unet/ (EMA weights unless --raw), vae/, text_encoder/, tokenizer/, scheduler/ and
    model_index.json; `StableDiffusionPipeline.from_pretrained(out)` and `sdray serve` load it.
    A LoRA run's checkpoint (train.lora.enabled) exports its adapter instead: pytorch_lora_weights.safetensors
    (diffusers' format) and sdray_lora.yaml, for `sdray generate --model BASE --lora out` (docs/finetune.md).
Checkpoints and outputs may be URIs (s3://bucket/runs/x/ray/train/checkpoint-...).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdray export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-step-* directory or URI")
    parser.add_argument(
        "--out", required=True, help="output model directory or URI (an earlier export there is replaced)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it holds something else"
    )
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args(argv)

    def body() -> None:
        from sdray.train.export import export_from_uri

        out = export_from_uri(args.checkpoint, args.out, use_ema=not args.raw, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} to {out}")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
