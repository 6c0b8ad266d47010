"""Train (or fine-tune) the VAE on an image parquet with Ray Train; export it in diffusers format.

Laptop:   sdray train-vae --config demo --data data/synth --out runs/vae [--model-dir runs/model]
Cluster:  ray job submit --working-dir . -- python -m pipelines.train_vae --config demo \
              --data s3://bucket/images --out /mnt/shared/vae --set vae_train.num_workers=8
Writes OUT/vae/ (AutoencoderKL.from_pretrained loads it; scaling factor measured on the data),
OUT/metrics.json (loss and held-out PSNR history), OUT/config.yaml and Ray Train checkpoints in OUT/ray/.
--model-dir also writes a full diffusers model directory: this VAE plus the config's text encoder, tokenizer,
UNet and scheduler; point `model.path` at it for preprocessing and UNet training (--set model.path=DIR: the
directory's architecture replaces the config's size overrides).
Skip this stage when you have a pretrained VAE for your image domain (see docs/demo.md).
"""

from __future__ import annotations

import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {"data": "vae_train.data", "out": "vae_train.output", "max_steps": "vae_train.max_steps"}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray train-vae", __doc__)
    parser.add_argument("--data", help="image parquet (file, directory or s3:// URI)")
    parser.add_argument("--out", help="run directory")
    parser.add_argument("--max-steps", type=int, dest="max_steps", help="optimizer steps")
    parser.add_argument("--model-dir", default="", help="also write a full model directory with this VAE")
    args = parser.parse_args(argv)

    def body() -> None:
        from sdray.vae.export import assemble_model_dir
        from sdray.vae.train import train_vae

        cfg = load_config(args, flag_overrides(args, FLAGS))
        result = train_vae(cfg.vae_train, cfg.model)
        print(f"held-out PSNR {result.psnr:.2f} dB after {result.steps} steps ({result.train_seconds:.0f} s)")
        print(f"wrote {result.vae_dir} (scaling factor {result.scaling_factor:.4f})")
        if args.model_dir:
            print(f"wrote {assemble_model_dir(result.vae_dir, cfg.model, args.model_dir)}")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
