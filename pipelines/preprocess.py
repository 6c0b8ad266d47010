"""Stage 1: image-caption parquet -> latent cache (VAE latents + CLIP text embeddings), with Ray Data.

Laptop:   sdray preprocess --config tiny --input data/synth --output data/latents
Cluster:  ray job submit --working-dir . -- python -m pipelines.preprocess --config sd15 \\
              --input 's3://bucket/laion/*.parquet' --output s3://bucket/latents --set preprocess.encode_concurrency=8
Re-running the same command resumes: finished input files are skipped, unfinished ones redone. Every input
row is written or listed in _rejects/ with a reason; totals go to _summary.json. See docs/preprocess.md.
"""

from __future__ import annotations

import json
import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {"input": "preprocess.input", "output": "preprocess.output", "resolution": "preprocess.resolution"}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray preprocess", __doc__)
    parser.add_argument("--input", help="parquet file, directory, glob or s3:// URI (comma-separate several)")
    parser.add_argument("--output", help="cache directory or s3:// URI (created, or resumed)")
    parser.add_argument("--resolution", type=int, help="side of the square crop, pixels")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS))
        from sdray.preprocess.run import run_preprocess

        summary = run_preprocess(cfg)
        print(json.dumps(summary, indent=2))
        rejected = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none"
        print(
            f"{cfg.preprocess.output}: {summary['rows_in']} rows in, {summary['rows_written']} written, "
            f"{summary['rows_rejected']} rejected ({rejected}); "
            f"this run {summary['this_run']['rows_in']} rows at {summary['this_run']['images_per_s']} images/s"
        )

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
