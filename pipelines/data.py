"""Make data sets.

sdray data synth --out data/synth --num-images 1024 --resolution 64
    Captioned synthetic scenes ("a large red circle in the top left on a black background") as parquet
    shards with an `image` {bytes, path} struct, `caption`, `id` and one column per attribute, plus
    _synth.json (config, held-out combinations). Deterministic by --seed. Settings: the `synth` section.
On a cluster, write locally and copy to object storage, or run on the head node.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {
    "num_images": "synth.num_images",
    "resolution": "synth.resolution",
    "seed": "synth.seed",
    "image_format": "synth.image_format",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdray data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser(
        "synth",
        help="write the synthetic captioned data set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in make_parser("sdray data synth", None)._actions[1:]:  # --config, --set, -v
        synth._add_action(action)
    synth.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    synth.add_argument("--num-images", type=int, dest="num_images", help="rows to write")
    synth.add_argument("--resolution", type=int, help="image side in pixels")
    synth.add_argument("--seed", type=int, help="seed of the whole data set")
    synth.add_argument("--image-format", dest="image_format", choices=["png", "jpeg"])
    synth.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS)).synth
        from sdray.data.synth import write_synth

        out = write_synth(cfg, args.out, overwrite=args.overwrite)
        print(f"wrote {cfg.num_images} images ({cfg.resolution}px) to {out}")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
