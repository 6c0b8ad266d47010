"""DreamBooth with prior preservation: a subject's images -> class images from the base model -> training.

Laptop:   sdray dreambooth --model runs/base/model --instance photos/ --instance-prompt "a photo of sks dog" \\
              --class-prompt "a photo of a dog" --num-class-images 200 --out runs/sks --steps 400
    LoRA instead of full fine-tuning: add --set train.lora.enabled=true (see docs/finetune.md).
Cluster:  ray job submit --working-dir . -- python -m pipelines.dreambooth --config sd15 --model s3://b/sd15 \\
              --instance s3://b/sks/ --instance-prompt "..." --class-prompt "..." --out s3://b/runs/sks \\
              --workers 4 --set train.use_gpu=true
Steps (each resumable; rerun the same command): instance set, class images (`sdray batch-generate`), the
two latent caches (`sdray preprocess`), training with train.class_data (`sdray train`).
"""

from __future__ import annotations

import json
import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {
    "model": "model.path",
    "instance": "dreambooth.instance_data",
    "instance_prompt": "dreambooth.instance_prompt",
    "class_prompt": "dreambooth.class_prompt",
    "num_class_images": "dreambooth.num_class_images",
    "out": "dreambooth.output",
    "steps": "train.max_steps",
    "workers": "train.num_workers",
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray dreambooth", __doc__)
    parser.add_argument("--model", help="base model directory (default: the config's model section)")
    parser.add_argument("--instance", help="folder of the subject's images, or parquet with an image column")
    parser.add_argument("--instance-prompt", dest="instance_prompt", help='e.g. "a photo of sks dog"')
    parser.add_argument("--class-prompt", dest="class_prompt", help='e.g. "a photo of a dog"')
    parser.add_argument("--num-class-images", dest="num_class_images", type=int)
    parser.add_argument("--out", help="work directory (created, or resumed)")
    parser.add_argument("--steps", type=int, help="optimizer steps (train.max_steps)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS))
        from sdray.dreambooth.run import run_dreambooth

        summary = run_dreambooth(cfg)
        print(json.dumps(summary, indent=2, default=str))
        print(f"model: {summary['model']}")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
