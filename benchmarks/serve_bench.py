"""Serve benchmark: throughput and p50/p95 latency at concurrency 1/4/8, batching on vs off, Serve overhead.

    .venv/bin/python benchmarks/serve_bench.py                      # tiny preset, writes benchmarks/results/
    .venv/bin/python benchmarks/serve_bench.py --steps 10 --requests 32 --model runs/exp1/model
    .venv/bin/python benchmarks/serve_bench.py --transport actor    # Ray Serve's default data plane, to compare

Two copies of the app run side by side in one Serve instance: `batched` (max_batch_size 8) and `unbatched`
(max_batch_size 1); each measurement alternates between them so machine noise hits both alike. Clients are
closed-loop threads (each sends its next request when the previous answers). Serve overhead = p50 of one
HTTP request (unbatched app, no batch wait) minus p50 of the same work in-process (sampler + PNG), measured
interleaved. Both sides use one torch thread (a model replica reserves one CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ray
import torch
from ray import serve

from sdray.cluster import SERVE_FAST_PATH_ENV
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.serve.api import read_server_timing
from sdray.serve.app import build_app
from sdray.serve.config import ServeConfig
from sdray.serve.request import GenerationRequest
from sdray.serve.sampler import Sampler, to_png

RESULTS = Path(__file__).resolve().parent / "results"
RAY_WORKER_NICENESS = 15


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _load(url: str, body: dict, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` closed-loop clients; latency in ms, throughput in images/s."""
    latencies: list[float] = []
    codes: list[int] = []

    def client(count: int) -> None:
        with httpx.Client(timeout=600) as c:
            for _ in range(count):
                start = time.perf_counter()
                r = c.post(url, json=body)
                latencies.append((time.perf_counter() - start) * 1000)
                codes.append(r.status_code)

    shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, shares))
    wall = time.perf_counter() - start
    assert set(codes) == {200}, codes
    return {
        "concurrency": concurrency,
        "requests": total,
        "throughput_img_s": total / wall,
        "p50_ms": _pct(latencies, 50),
        "p95_ms": _pct(latencies, 95),
    }


def _overhead(url: str, sampler: Sampler, body: dict, req: GenerationRequest, rounds: int) -> dict:
    """Interleaved: one in-process sample+PNG, then the same request over HTTP; p50s and their difference.

    Also per HTTP request, from its Server-Timing header: latency minus the model replica's own sampler + PNG
    time (what Serve adds around the pipeline call, free of the run-to-run noise of the compute), split at
    the ingress handler.
    """
    direct, http, timings = [], [], []
    with httpx.Client(timeout=600) as c:
        c.post(url, json=body)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            to_png(sampler.generate([req])[0][0])
            direct.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            r = c.post(url, json=body)
            http.append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200
            timings.append(read_server_timing(r.headers["Server-Timing"]))
    base = url.removesuffix("/v1/images/generations")
    hops = {"ingress_only_ms": [], "ingress_and_model_ms": []}
    with httpx.Client(timeout=600) as c:
        for _ in range(rounds):  # Serve's own round trips, no compute: proxy -> ingress (-> model handle)
            for key, path in (
                ("ingress_only_ms", "/sdapi/v1/samplers"),
                ("ingress_and_model_ms", "/healthz"),
            ):
                start = time.perf_counter()
                c.get(base + path)
                hops[key].append((time.perf_counter() - start) * 1000)
    return {
        "steps": req.steps,
        "rounds": rounds,
        "get_samplers_p50_ms": statistics.median(hops["ingress_only_ms"]),
        "get_healthz_p50_ms": statistics.median(hops["ingress_and_model_ms"]),
        "direct_p50_ms": statistics.median(direct),
        "http_p50_ms": statistics.median(http),
        "overhead_p50_ms": statistics.median(http) - statistics.median(direct),
        "overhead_median_of_pairs_ms": statistics.median(h - d for h, d in zip(http, direct, strict=True)),
        "model_p50_ms": statistics.median(t["model"] for t in timings),
        "latency_minus_model_p50_ms": statistics.median(
            h - t["model"] for h, t in zip(http, timings, strict=True)
        ),
        "proxy_and_http_p50_ms": statistics.median(
            h - t["ingress"] for h, t in zip(http, timings, strict=True)
        ),
        "ingress_minus_model_p50_ms": statistics.median(t["ingress"] - t["model"] for t in timings),
    }


def _in_process_batching(sampler: Sampler, req: GenerationRequest, rounds: int = 3) -> dict:
    """The compute gain alone: 8 requests as one batch vs one at a time, in this process, interleaved."""
    reqs = [replace(req, seeds=(i,)) for i in range(8)]
    ratios, single_s, batch_s = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for r in reqs:
            sampler.sample([r], list(r.seeds))
        single_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        sampler.sample(reqs, list(range(8)))
        batch_s.append(time.perf_counter() - start)
        ratios.append(single_s[-1] / batch_s[-1])
    return {
        "eight_singles_s": single_s,
        "one_batch_of_eight_s": batch_s,
        "speedup_median": statistics.median(ratios),
    }


def _batch_stats(app: str) -> dict[str, int]:
    return serve.get_deployment_handle("SDModel", app_name=app).stats.remote().result()


def _compare(urls: dict[str, str], body: dict, requests: int, rounds: int) -> list[dict]:
    """Per concurrency level, ``rounds`` alternating runs of each app; merged latencies, per-round ratios."""
    load = []
    for concurrency in (1, 4, 8):
        total = max(requests // 2, 8) if concurrency == 1 else requests
        runs: dict[str, list[dict]] = {name: [] for name in urls}
        batches: dict[str, int] = {}
        for round_ in range(rounds):
            order = list(urls) if round_ % 2 == 0 else list(urls)[::-1]  # alternate who goes first
            for name in order:
                _load(urls[name], body, concurrency, concurrency)  # warm-up, and fills the batch queue
                before = _batch_stats(name)["batches"]
                runs[name].append(_load(urls[name], body, concurrency, total))
                batches[name] = batches.get(name, 0) + _batch_stats(name)["batches"] - before
        ratios = [b["throughput_img_s"] / u["throughput_img_s"] for b, u in zip(*runs.values(), strict=True)]
        for name, rs in runs.items():
            load.append({
                "app": name,
                "concurrency": concurrency,
                "requests": total * rounds,
                "throughput_img_s": statistics.median(r["throughput_img_s"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p95_ms": statistics.median(r["p95_ms"] for r in rs),
                "mean_requests_per_batch": total * rounds / max(batches[name], 1),
                "batched_over_unbatched_per_round": ratios,
            })  # fmt: skip
            print(json.dumps(load[-1]), flush=True)
    return load


def _machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "?")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _deploy(model_cfg: ModelConfig, port: int, batch_wait_s: float) -> dict[str, str]:
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    urls = {}
    for name, batch, wait in (("batched", 8, batch_wait_s), ("unbatched", 1, 0.0)):
        cfg = ServeConfig(port=port, max_batch_size=batch, batch_wait_timeout_s=wait, max_queued_requests=256)
        serve.run(build_app(cfg, model_cfg), name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{port}/{name}/v1/images/generations"
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="diffusers model directory (default: tiny preset)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--requests", type=int, default=24, help="requests per measurement at concurrency 4/8"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating batched/unbatched rounds per level"
    )
    parser.add_argument("--overhead-rounds", type=int, default=30)
    parser.add_argument("--batch-wait-s", type=float, default=ServeConfig().batch_wait_timeout_s)
    parser.add_argument(
        "--transport",
        choices=("grpc", "actor"),
        default="grpc",
        help="Serve's data plane: gRPC as sdray's local Ray sets it (default), or Ray actor calls",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Ray runs worker processes (the Serve replicas) at niceness 15; the in-process baseline must too, or on a
    # busy machine it gets more CPU than the replicas and "overhead" measures the scheduler, not Serve.
    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    model_cfg = ModelConfig(path=args.model)
    machine = _machine()
    # Serve's proxy and replicas read the transport from their environment when they start.
    for name, value in SERVE_FAST_PATH_ENV.items():
        os.environ[name] = value if args.transport == "grpc" else "0"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = _deploy(model_cfg, port, args.batch_wait_s)
    body = {"prompt": "a large red circle in the top left", "size": f"{args.size}x{args.size}",
            "steps": args.steps, "seed": 0, "scheduler": "euler"}  # fmt: skip
    load = _compare(urls, body, args.requests, args.rounds)
    sampler = Sampler(load_components(model_cfg), source=model_cfg.source)
    overhead = []
    for steps in (1, args.steps):
        req = GenerationRequest(prompt=body["prompt"], seeds=(0,), width=args.size, height=args.size,
                                steps=steps, guidance_scale=7.5, scheduler="euler")  # fmt: skip
        overhead.append(
            _overhead(urls["unbatched"], sampler, {**body, "steps": steps}, req, args.overhead_rounds)
        )
        print(json.dumps(overhead[-1]), flush=True)
    in_process = _in_process_batching(sampler, req)
    print(json.dumps(in_process), flush=True)
    machine["load_average_at_end"] = os.getloadavg()
    serve.shutdown()
    ray.shutdown()
    _write(machine, vars(args), load, overhead, in_process)


def _write(machine: dict, settings: dict, load: list[dict], overhead: list[dict], in_process: dict) -> None:
    by = {(row["app"], row["concurrency"]): row for row in load}
    speedup = {
        c: by["batched", c]["throughput_img_s"] / by["unbatched", c]["throughput_img_s"] for c in (1, 4, 8)
    }
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "load": load,
        "batching_speedup": speedup,
        "overhead": overhead,
        "in_process_batching": in_process,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"serve_{'tiny' if not settings['model'] else 'model'}_{settings['size']}px"
    stem += "" if settings["transport"] == "grpc" else f"_{settings['transport']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Serve benchmark ({result['when']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, GPU {machine['gpu']}; "
        f"torch {machine['torch']}, ray {machine['ray']}. Load average at start {machine['load_average_at_start']}, "
        f"at end {machine['load_average_at_end']} (other engineers' jobs share the machine: absolute numbers are "
        "noisy, ratios measured side by side in one run are the result).",
        "",
        f"Request: {settings['size']}x{settings['size']}, {settings['steps']} steps, euler, guidance 7.5, "
        "one image; one model replica (1 CPU, 1 torch thread) per app; the benchmark process runs at Ray's "
        f"worker niceness (15) like the replicas. Serve data plane: {settings['transport']}.",
        "",
        f"Each row: median over {settings['rounds']} rounds; batched and unbatched alternate within a round "
        "(who goes first alternates too); requests = total over the rounds; batched app: max_batch_size 8, "
        f"batch_wait_timeout_s {settings['batch_wait_s']}.",
        "",
        "| app | concurrency | requests | images/s | p50 ms | p95 ms | requests per batch |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['app']} | {r['concurrency']} | {r['requests']} | {r['throughput_img_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_requests_per_batch']:.1f} |"
            for r in load
        ),
        "",
        "Batching speedup (median over rounds of batched / unbatched throughput in the same round): "
        + ", ".join(f"concurrency {c}: {s:.2f}x" for c, s in speedup.items()),
        "",
        "Without Serve (the sampler in this process, same request): one batch of 8 vs 8 single requests, "
        f"median speedup {in_process['speedup_median']:.2f}x over {len(in_process['eight_singles_s'])} "
        "interleaved rounds.",
        "",
        "Serve overhead: HTTP p50 minus in-process p50 (interleaved). For scale, Serve's own round trips "
        "without compute: GET /sdapi/v1/samplers (proxy -> ingress) and GET /healthz (proxy -> ingress -> "
        "model handle).",
        "",
        "| steps | direct p50 ms (sampler + PNG) | HTTP p50 ms | overhead p50 ms | median of paired differences ms "
        "| GET samplers p50 ms | GET healthz p50 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {o['steps']} | {o['direct_p50_ms']:.1f} | {o['http_p50_ms']:.1f} | {o['overhead_p50_ms']:.1f} | "
            f"{o['overhead_median_of_pairs_ms']:.1f} | {o['get_samplers_p50_ms']:.1f} | {o['get_healthz_p50_ms']:.1f} |"
            for o in overhead
        ),  # fmt: skip
        "",
        "Serve overhead per request from the same HTTP requests' Server-Timing header: latency minus the model "
        "replica's own sampler + PNG time (`model`), split at the ingress handler (`ingress`).",
        "",
        "| steps | model p50 ms (in the replica) | latency - model p50 ms | proxy + HTTP (latency - ingress) p50 ms "
        "| ingress - model p50 ms |",
        "|---|---|---|---|---|",
        *(
            f"| {o['steps']} | {o['model_p50_ms']:.1f} | **{o['latency_minus_model_p50_ms']:.1f}** | "
            f"{o['proxy_and_http_p50_ms']:.1f} | {o['ingress_minus_model_p50_ms']:.1f} |"
            for o in overhead
        ),  # fmt: skip
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
