"""Scale to zero, run for real on a local Ray: the model deployment goes to 0 replicas when idle, and the next
request starts one (a cold start) and is answered.

    .venv/bin/python benchmarks/serve_scale_to_zero.py            # tiny preset; writes benchmarks/results/

Measures: seconds from deploy until the model deployment holds no replica, the first request's latency (cold
start: replica process + model load + sampling), the next request's latency (warm), and the replica counts
seen. On a cluster the same settings also release the replica's node to the cluster autoscaler (docs/serve.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ray
from ray import serve

from sdray.cluster import export_serve_fast_path
from sdray.models.config import ModelConfig
from sdray.serve.app import APP_NAME, start
from sdray.serve.config import ServeConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _model_replicas() -> int:
    """Model replicas Serve reports as running (or starting) now."""
    deployment = serve.status().applications[APP_NAME].deployments["SDModel"]
    return sum(n for state, n in deployment.replica_states.items() if state in ("RUNNING", "STARTING"))


def _wait_for_replicas(count: int, timeout_s: float) -> float:
    start = time.perf_counter()
    while _model_replicas() != count:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"model deployment did not reach {count} replicas in {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.perf_counter() - start


def _timed_post(url: str, body: dict) -> float:
    start = time.perf_counter()
    r = httpx.post(url, json=body, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="diffusers model directory (default: tiny preset)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="downscale_to_zero_delay_s")
    args = parser.parse_args()
    export_serve_fast_path()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(
        port=port,
        min_replicas=0,
        max_replicas=1,
        upscale_delay_s=0.0,
        downscale_delay_s=args.idle_s,
        downscale_to_zero_delay_s=args.idle_s,
    )
    deployed = time.perf_counter()
    url = start(cfg, ModelConfig(path=args.model)) + "v1/images/generations"
    ready_s = time.perf_counter() - deployed
    replicas_at_start = _model_replicas()
    to_zero_s = _wait_for_replicas(0, timeout_s=120) + ready_s
    body = {"prompt": "a large red circle in the top left", "size": "64x64", "steps": 4, "seed": 0}
    cold_s = _timed_post(url, body)
    replicas_after = _model_replicas()
    warm_s = _timed_post(url, body)
    serve.shutdown()
    ray.shutdown()
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "settings": {**vars(args), "min_replicas": 0, "request": body},
        "replicas_at_start": replicas_at_start,
        "seconds_from_deploy_to_zero_replicas": round(to_zero_s, 1),
        "cold_request_s": round(cold_s, 2),
        "replicas_after_cold_request": replicas_after,
        "warm_request_s": round(warm_s, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "serve_scale_to_zero_tiny.json" if not args.model else "serve_scale_to_zero_model.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if replicas_after != 1:
        raise SystemExit(f"expected 1 model replica after the cold request, saw {replicas_after}")


if __name__ == "__main__":
    main()
