"""Serve the text-to-image sampler over HTTP with Ray Serve: OpenAI + AUTOMATIC1111 APIs and a web page.

Laptop:   sdray serve                                  # tiny preset -> http://127.0.0.1:8000/ (web page)
          sdray serve --model runs/exp1/model --port 8080 --check   # check model folder and port only
          SDRAY_API_KEY=secret sdray serve             # clients then send `Authorization: Bearer secret`
          sdray serve --model runs/base/model --adapters adapters/   # LoRA adapters: model "BASE:NAME"
          sdray serve --topology single                # API and model in one replica: lower latency
Cluster:  serve deploy pipelines/serve.yaml    # autoscaling, scale to zero: see docs/serve.md
          ray job submit --working-dir . -- sdray serve --model /shared/model --set serve.num_gpus=1
Settings: the `serve` section (docs/config.md); the HTTP API: docs/serve.md. Ctrl-C stops the service.
"""

from __future__ import annotations

import os
import sys

from pipelines.common import flag_overrides, load_config, make_parser, run

FLAGS = {
    "model": "model.path",
    "host": "serve.host",
    "port": "serve.port",
    "max_batch_size": "serve.max_batch_size",
    "num_gpus": "serve.num_gpus",
    "adapters": "serve.adapters",
    "topology": "serve.topology",
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sdray serve", __doc__)
    parser.add_argument("--model", help="diffusers model directory (default: the config's model section)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int, help="images per UNet call")
    parser.add_argument("--num-gpus", dest="num_gpus", type=float, help="GPUs per model replica")
    parser.add_argument(
        "--check", action="store_true", help="check the config, model directory and port, then exit"
    )
    parser.add_argument("--adapters", help="LoRA adapter store: directory or s3:// prefix, one subdir each")
    parser.add_argument(
        "--topology",
        choices=("split", "single"),
        help="split (default): HTTP ingress + autoscaled model replicas; single: one deployment, one hop less",
    )
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args, flag_overrides(args, FLAGS))
        from sdray.serve.app import check_inputs, serve_forever

        key = cfg.serve.api_key_env
        auth = (
            f"API key required (${key})" if os.environ.get(key) else f"no API key (set ${key} to require one)"
        )
        check_inputs(cfg.serve, cfg.model)
        if args.check:
            print(f"ok: would serve {cfg.model.source} on http://{cfg.serve.host}:{cfg.serve.port}/ ({auth})")
            return
        print(f"starting Ray Serve with {cfg.model.source} ...", flush=True)
        serve_forever(
            cfg.serve, cfg.model, ready=lambda url: print(f"serving {url} ({auth}; Ctrl-C stops)", flush=True)
        )

    return run(body, verbose=args.verbose, interrupted="stopped: sdray serve shut down")


if __name__ == "__main__":
    sys.exit(main())
