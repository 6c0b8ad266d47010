"""Stage 2: train the UNet on a latent cache with Ray Train; checkpoints, metrics, validation grids, export.

sdray train --data runs/cache --out runs/tiny                        # tiny preset, 1 CPU worker
sdray train --data runs/cache --out runs/tiny --workers 2 --steps 200
    Outputs in --out: metrics.jsonl, loss_curve.png, validation/step-*.png, model/ (diffusers format, EMA
    UNet), ray/train/checkpoint-step-* (the last train.keep_checkpoints). Rerun the same command to resume.
sdray train --data runs/cache --out runs/lora --set model.path=BASE --set train.lora.enabled=true
    LoRA on a pretrained model: only the adapter trains; lora/ replaces model/ (docs/finetune.md).
On a cluster (GPUs, object storage; RAY_ADDRESS is set by `ray job submit`):
    ray job submit --working-dir . -- python -m pipelines.train --config sd15 \
        --data s3://bucket/cache --out s3://bucket/runs/sd15 --workers 8 --set train.use_gpu=true
Settings: the `train` section (docs/config.md); the cache must come from the same `model` section.
"""

from __future__ import annotations

import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {
    "data": "train.data",
    "out": "train.output",
    "workers": "train.num_workers",
    "steps": "train.max_steps",
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray train", __doc__)
    parser.add_argument("--data", help="latent cache directory or URI (train.data)")
    parser.add_argument("--out", help="run directory or URI (train.output); an existing run resumes")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers)")
    parser.add_argument("--steps", type=int, help="optimizer steps in total (train.max_steps)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS))
        from sdray.train.run import run_training

        result = run_training(cfg.train, cfg.model, cfg.tracking)
        if result.already_done:
            print(
                f"{result.output} is already at step {result.step} (asked for {cfg.train.max_steps}): "
                "nothing trained, its train_config.yaml unchanged; a larger --steps continues it"
            )
        loss = result.metrics.get("loss")
        print(
            f"trained to step {result.step} (loss {loss:.4f})" if loss is not None else f"step {result.step}"
        )
        print(f"run: {result.output}\ncheckpoint: {result.checkpoint}")
        for kind, path in (("model", result.model), ("lora", result.lora)):
            if path:
                print(f"{kind}: {path}")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
