"""`sdray`: one console script whose subcommands are the stage entry points in `pipelines/`.

Each subcommand is the `main(argv)` of a module here, so `sdray train ...` and `python -m pipelines.train ...`
are the same code. Modules are imported only when their subcommand runs, and each imports the stage's library
(torch, diffusers, Ray) inside its body, after the config is resolved: `sdray --help`, `sdray train --help` and
`--print-config` take a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("pipelines.data", "make data sets (`sdray data synth`: captioned synthetic scenes)"),
    "serve": ("pipelines.serve", "stage 3: the sampler as an HTTP service (Ray Serve) with a web page"),
    "generate": ("pipelines.generate", "text to image with the stage 3 sampler, without Serve"),
    "batch-generate": (
        "pipelines.batch_generate",
        "prompt files -> image parquet (the layout `sdray preprocess` reads), on a Ray Data sampler pool",
    ),
    "preprocess": (
        "pipelines.preprocess",
        "stage 1: image-caption parquet -> cached VAE latents + text embeddings",
    ),
    "train": (
        "pipelines.train",
        "stage 2: train the UNet on cached latents (Ray Train), resumable, exports a model",
    ),
    "dreambooth": (
        "pipelines.dreambooth",
        "DreamBooth: subject images + class images from the base model -> prior-preserving training",
    ),
    "export": ("pipelines.export", "export a training checkpoint as a diffusers model directory"),
    "train-vae": ("pipelines.train_vae", "train or fine-tune the VAE on an image parquet (Ray Train)"),
    "evaluate": ("pipelines.evaluate", "caption faithfulness of generated images (colour, shape, position)"),
    "demo": ("pipelines.demo", "end to end: synth data, VAE, preprocess, train, sample, evaluate -> report"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: sdray COMMAND [options]   (sdray COMMAND --help for a command's options)\n\n"
        "Stable Diffusion as a distributed data-and-training pipeline on Ray.\n\ncommands:\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
