"""Offline generation: prompt files -> image shards on a Ray Data actor pool of samplers (resumable).

Laptop:   sdray batch-generate --model runs/tiny/model --prompts prompts.jsonl --output data/generated
Cluster:  ray job submit --working-dir . -- python -m pipelines.batch_generate --config sd15 \\
              --model s3://bucket/model --prompts s3://bucket/prompts/ --output s3://bucket/generated \\
              --set batch_generate.concurrency=8 --set batch_generate.batch_size=8
Prompt files: .txt (one prompt a line), .jsonl or .parquet with a `prompt` column and optional id, seed,
steps, size (WxH) or width/height, guidance_scale, scheduler, negative_prompt. Rerunning resumes (finished
files are skipped); bad rows go to _rejects/ with a reason. The output feeds `sdray preprocess --input`.
"""

from __future__ import annotations

import json
import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {
    "model": "model.path",
    "prompts": "batch_generate.prompts",
    "output": "batch_generate.output",
    "lora": "batch_generate.loras",
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray batch-generate", __doc__)
    parser.add_argument("--model", help="diffusers model directory (default: the config's model section)")
    parser.add_argument("--prompts", help="prompt file(s) or a directory of them (comma-separate several)")
    parser.add_argument("--output", help="output directory or s3:// URI (created, or resumed)")
    parser.add_argument("--lora", action="append", metavar="DIR[:SCALE]", help="LoRA adapter (repeatable)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS))
        from sdray.batchgen.run import run_batch_generate

        summary = run_batch_generate(cfg)
        print(json.dumps(summary, indent=2))
        rejected = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none"
        print(
            f"{cfg.batch_generate.output}: {summary['rows_in']} prompts, {summary['rows_written']} images, "
            f"{summary['rows_rejected']} rejected ({rejected}); "
            f"this run {summary['this_run']['images_written']} at {summary['this_run']['images_per_s']} images/s"
        )

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
