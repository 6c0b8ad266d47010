"""Text to image with the Stage 3 sampler, without Serve (the HTTP API's request model and sampler).

sdray generate --prompt "a large red circle in the top left" --seed 1 --out x.png        # tiny preset
sdray generate --model runs/exp1/model --prompt "..." --steps 30 --scheduler dpmpp_2m --size 512x512 --out x.png
    --n 4 writes x-0.png .. x-3.png with seeds seed, seed+1, ...; no --seed draws one and prints it.
sdray generate --model BASE --lora runs/a/lora:0.8 --lora runs/b/lora ...   # LoRA DIR[:SCALE], docs/finetune.md
    Defaults (steps, guidance, scheduler) and limits come from the `serve` section (docs/config.md).
"""

from __future__ import annotations

import sys

from pipelines.common import flag_overrides, load_config, make_parser, run
from sdray.models.lora import LoraSpec
from sdray.serve.config import SCHEDULER_NAMES

REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "n", "size", "steps", "guidance_scale", "scheduler")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray generate", __doc__)
    parser.add_argument("--model", help="diffusers model directory (default: the config's model section)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", dest="negative_prompt")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random, printed)")
    parser.add_argument("--n", type=int, help="number of images (default 1)")
    parser.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    parser.add_argument("--lora", action="append", default=[], metavar="DIR[:SCALE]", help="repeatable")
    parser.add_argument("--out", required=True, help="output .png (--n 2: out-0.png, out-1.png)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, {"model": "model.path"}))

        from tqdm import tqdm

        from sdray.models.components import load_components
        from sdray.serve.request import size_warning
        from sdray.serve.sampler import Sampler, generate_files
        from sdray.serve.schemas import parse_images_request

        fields = {name: getattr(args, name) for name in REQUEST_FIELDS if getattr(args, name) is not None}
        loras = [LoraSpec.parse(text) for text in args.lora]  # a missing weights file fails in Sampler
        sampler = Sampler(load_components(cfg.model), source=cfg.model.source, loras=loras)
        req = parse_images_request(fields).to_generation(cfg.serve, sampler.info)
        if warning := size_warning(req, sampler.info):
            print(f"note: {warning}")
        chunks = -(-len(req.seeds) // cfg.serve.max_batch_size)
        with tqdm(total=req.steps * chunks, desc="sampling", unit="step", file=sys.stdout) as bar:
            paths = generate_files(sampler, req, cfg.serve, args.out, on_step=bar.update)
        for path, seed in zip(paths, req.seeds, strict=True):
            print(f"wrote {path} ({req.width}x{req.height}, seed {seed}, {req.steps} steps {req.scheduler})")

    return run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
