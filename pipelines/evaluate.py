"""Caption faithfulness of generated images: do they show the colour, shape and position their prompt asks for?

sdray evaluate --generated out/samples --data data/synth --out out/eval
    --generated: PNGs plus manifest.jsonl ({"file": "000.png", "prompt": "a large red circle in the top left
    ..."} per line). --data: the synth data set; gives real images (upper bound) and the held-out
    combinations (reported separately). The baseline is the generated images scored against shuffled
    prompts, or --baseline DIR (images + manifest, e.g. unconditional samples).
    Writes OUT/metrics.json and OUT/grid.png (each image with its prompt: green = all attributes right).
The attributes are measured from pixels (no model), so any image generator can be evaluated.
"""

from __future__ import annotations

import sys

from pipelines.common import make_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray evaluate", __doc__, print_config=False)
    parser.add_argument("--generated", required=True, help="directory of PNGs with manifest.jsonl")
    parser.add_argument("--out", required=True, help="directory for metrics.json and grid.png")
    parser.add_argument("--data", default="", help="synth data set: real images and held-out combinations")
    parser.add_argument("--num-real", type=int, default=256, help="real images to score (upper bound)")
    parser.add_argument("--baseline", default="", help="baseline images with manifest (default: shuffled)")
    args = parser.parse_args(argv)

    def body() -> None:
        from sdray.evaluate import EvaluateOptions, evaluate_dir, summary_lines

        opts = EvaluateOptions(
            generated=args.generated,
            output=args.out,
            data=args.data,
            num_real=args.num_real,
            baseline=args.baseline,
        )
        metrics = evaluate_dir(opts)
        print("\n".join(summary_lines(metrics)))
        print(f"wrote {args.out}/metrics.json and {args.out}/grid.png")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
