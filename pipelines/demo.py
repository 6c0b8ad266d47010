"""The end-to-end demo: synthetic scenes -> VAE -> latents (Ray Data) -> UNet (Ray Train) -> samples -> report.

sdray demo                       # full run into runs/demo (11-12 minutes on an idle 2-core CPU)
sdray demo --quick --out runs/demo-quick   # 1-2 minute smoke run (tiny step counts, small data)
sdray demo --overwrite           # replace an existing run directory (otherwise it is refused)
    Stage sizes come from --config (default `demo`, see pipelines/configs/demo.yaml) and --set overrides.
    Writes OUT/report/: grid.png (samples with prompts), loss_curves.png, metrics.json, report.md.
Cluster: the same command through `ray job submit -- python -m pipelines.demo ...` (RAY_ADDRESS is set).
"""

from __future__ import annotations

import json
import sys

from pipelines.common import cli_overrides, make_parser, run, stop_if_printing
from sdray.demo.config import DemoOptions


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray demo", __doc__)
    parser.set_defaults(config="demo")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, few steps")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    defaults = DemoOptions()
    for flag, kind, help_text in (
        ("samples_per_prompt", int, "images per combination"),
        ("sampler_steps", int, "sampler steps per image"),
        ("guidance_scale", float, "classifier-free guidance"),
    ):
        default = getattr(defaults, flag)
        parser.add_argument("--" + flag.replace("_", "-"), type=kind, default=default,
                            help=f"{help_text} (default {default})")  # fmt: skip
    args = parser.parse_args(argv)

    def body() -> None:
        from sdray.demo import DemoOptions, demo_config, run_demo
        from sdray.evaluate import summary_lines

        opts = DemoOptions(
            output=args.out,
            quick=args.quick,
            overwrite=args.overwrite,
            samples_per_prompt=args.samples_per_prompt,
            sampler_steps=args.sampler_steps,
            guidance_scale=args.guidance_scale,
        )
        cfg = demo_config(args.config, cli_overrides(args), quick=args.quick)
        stop_if_printing(args, cfg)
        report = run_demo(opts, cfg, progress=lambda line: print(line, flush=True))
        metrics = json.loads((report / "metrics.json").read_text())
        print("\n".join(summary_lines(metrics["faithfulness"])))
        print(f"total {metrics['total_seconds']:.0f} s; wrote {report}/report.md")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
