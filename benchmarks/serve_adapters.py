"""LoRA adapters behind one endpoint: cold load, warm latency adapter vs base, throughput when requests rotate.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_adapters.py                  # tiny preset, 64x64, 4 steps
    PYTHONPATH=. .venv/bin/python benchmarks/serve_adapters.py --requests 48 --steps 8

One local Ray; an adapter store of 3 tiny-model adapters (random non-zero LoRA matrices, rank 4) in a temp
directory. For each setup the sdray app is (re)deployed and measured:

- `cold_ms` / `warm_ms`: the first request for an adapter (loads it) and the p50 of later ones, and the base
  model's p50 (sequential requests); `load_ms` = cold - warm of the same adapter;
- `rps`: requests per second at concurrency 8 with requests rotating over the 3 adapters, and how many
  adapter loads that took (a replica with an LRU of 1 reloads on nearly every switch).

Setups: `max_adapters_per_replica` 1 vs 3 with one model replica, then both with 2 replicas (Serve's
multiplexed routing sends an adapter's requests to the replica that holds it). Results:
benchmarks/results/serve_adapters.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = ["a", "b", "c"]
SETUPS = [(1, 1), (3, 1), (1, 2), (3, 2)]  # (max_adapters_per_replica, replicas)


def make_store(root: Path) -> None:
    """Three adapters for the tiny preset, as `sdray train` with train.lora exports them."""
    import torch

    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.train.config import LoraConfig
    from sdray.train.lora import add_adapter, save_lora_dir

    for seed, name in enumerate(ADAPTERS):
        unet = load_components(ModelConfig(), ["unet"]).unet
        add_adapter(unet, LoraConfig(enabled=True, rank=4), seed=seed)
        with torch.no_grad():
            for key, p in unet.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.3)
        (root / name).mkdir()
        save_lora_dir(unet, root / name)


def _post(client, url: str, body: dict) -> float:  # noqa: ANN001 - httpx.Client
    start = time.perf_counter()
    client.post(url, json=body).raise_for_status()
    return (time.perf_counter() - start) * 1000


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("SDModel", app_name="sd").stats.remote().result()


def measure(url: str, body: dict, base_id: str, requests: int, replicas: int) -> dict:
    """Cold/warm latency (one replica only: with two, which replica answers is Serve's choice) and rps."""
    import httpx

    def pick(name: str) -> dict:
        return {**body, "model": f"{base_id}:{name}"}

    out: dict = {}
    with httpx.Client(timeout=600) as c:
        c.post(url, json=body).raise_for_status()  # warm the base path
        if replicas == 1:
            out["cold_ms"] = round(_post(c, url, pick("a")), 1)
            out["warm_ms"] = round(statistics.median(_post(c, url, pick("a")) for _ in range(5)), 1)
            out["base_ms"] = round(statistics.median(_post(c, url, body) for _ in range(5)), 1)
            out["load_ms"] = round(out["cold_ms"] - out["warm_ms"], 1)
            loads_before = _stats()["adapter_loads"]
        bodies = [{**pick(ADAPTERS[i % 3]), "seed": i} for i in range(requests)]
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda b: _post(c, url, b), bodies))
        out["rps"] = round(requests / (time.perf_counter() - start), 2)
        if replicas == 1:
            out["adapter_loads"] = _stats()["adapter_loads"] - loads_before
    return out


def run_setups(store: Path, requests: int, steps: int) -> list[dict]:
    import httpx
    from ray import serve

    from sdray.models.config import ModelConfig
    from sdray.serve.app import build_app
    from sdray.serve.config import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    body = {"prompt": "a large red circle", "size": "64x64", "steps": steps, "seed": 0, "scheduler": "ddim"}
    url = f"http://127.0.0.1:{port}"
    rows = []
    for lru, replicas in SETUPS:
        cfg = ServeConfig(
            port=port, adapters=str(store), max_adapters_per_replica=lru, min_replicas=replicas,
            max_replicas=replicas, num_cpus=0.5, max_batch_size=8, batch_wait_timeout_s=0.05,
            max_ongoing_requests=16, max_queued_requests=256,
        )  # fmt: skip
        serve.run(build_app(cfg, ModelConfig()), name="sd", route_prefix="/", blocking=False)
        while httpx.get(url + "/healthz", timeout=600).status_code != 200:
            time.sleep(1)
        base_id = httpx.get(url + "/v1/models", timeout=600).json()["data"][0]["id"]
        row = {"max_adapters_per_replica": lru, "replicas": replicas}
        row.update(measure(url + "/v1/images/generations", body, base_id, requests, replicas))
        print(json.dumps(row), flush=True)
        rows.append(row)
        serve.delete("sd")
    serve.shutdown()
    return rows


COLUMNS = [
    ("max_adapters_per_replica", "LRU size"),
    ("replicas", "replicas"),
    ("cold_ms", "cold adapter request ms"),
    ("warm_ms", "warm adapter p50 ms"),
    ("base_ms", "base p50 ms"),
    ("load_ms", "load ms (cold - warm)"),
    ("rps", "req/s at concurrency 8, 3 adapters"),
    ("adapter_loads", "adapter loads in that run"),
]


def write(rows: list[dict], requests: int, steps: int, load_start: tuple[float, ...]) -> None:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    load_end = tuple(round(x, 2) for x in os.getloadavg())
    meta = {"when": when, "requests": requests, "steps": steps, "size": "64x64", "model": "tiny preset",
            "load_avg_1_5_15_start": load_start, "load_avg_1_5_15_end": load_end}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_adapters.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# LoRA adapters behind one endpoint ({when})",
        "",
        f"{os.cpu_count()} cores, no GPU, load average (1/5/15 min) {load_start} at start and {load_end} at "
        f"the end; tiny preset, 64x64, "
        f"{steps} DDIM steps; {requests} requests at concurrency 8 rotating over 3 adapters "
        "(benchmarks/serve_adapters.py). Cold/warm/base latencies and loads only with one replica.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |")
    (RESULTS / "serve_adapters.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import ray
    import torch

    load_start = tuple(round(x, 2) for x in os.getloadavg())
    torch.set_num_threads(1)
    store = Path(tempfile.mkdtemp(prefix="sdray-adapters-"))
    make_store(store)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        rows = run_setups(store, args.requests, args.steps)
    finally:
        ray.shutdown()
    write(rows, args.requests, args.steps, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
