"""Stage 1 across the nodes of a local multi-node Ray cluster: throughput by number of nodes (one encoder
actor each), from the same input.

    .venv/bin/python benchmarks/preprocess_scaling.py --nodes 1 2 --node-cpus 2 --num-images 1024 4096
    .venv/bin/python benchmarks/preprocess_scaling.py --nodes 1 2 4 --node-cpus 4 --num-images 4096 16384

Writes benchmarks/results/preprocess_scaling_<preset>_<resolution>.{json,md}. For each node count N it starts
the cluster of scripts/local_cluster.py (`ray.cluster_utils.Cluster`: a head with no CPUs and N worker nodes
of `--node-cpus` logical CPUs), runs `run_preprocess` with N encoder actors (`encode_concurrency`; Ray Data
spreads them over the nodes) on each data set size, and stops the cluster. The marginal rate (the extra
images over the extra seconds between the two sizes) is the steady state once each run's fixed cost is paid;
scaling efficiency is that rate over N times the rate of the smallest N.

All nodes share this machine's cores: N nodes of C logical CPUs scale only while N x C stays within the
physical cores, so the result says something about sdray only on a machine with the cores for it (on the
2-core VM one 2-CPU node already uses both cores: a node reserves a CPU for reads and decoding beside its
encoder actor). The table records the machine's core count beside the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

from sdray.data.synth import SynthConfig, write_synth
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess.run import run_preprocess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the cluster of the local multi-node workflow (docs/cluster.md)
from local_cluster import start_cluster  # noqa: E402
from results_file import publish, run_header  # noqa: E402


def timed_run(args: argparse.Namespace, data: Path, out: Path, nodes: int) -> float:
    """End-to-end seconds of run_preprocess on the running cluster: an encoder actor a node reserving half its
    CPUs, decode tasks on the other half; torch threads as sdray's default (encode_threads 0: the machine's
    cores shared by the actors on it, sdray.cluster.actor_threads)."""
    half = args.node_cpus / 2
    cfg = load_pipeline_config(
        args.preset,
        [
            f"preprocess.input={data}",
            f"preprocess.output={out}",
            f"preprocess.resolution={args.resolution}",
            f"preprocess.encode_concurrency={nodes}",
            f"preprocess.encode_num_cpus={half}",
            f"preprocess.decode_num_cpus={min(1.0, half)}",
        ],
    )
    start = time.perf_counter()
    summary = run_preprocess(cfg, label=f"{nodes} node(s)")
    seconds = time.perf_counter() - start
    if summary["this_run"]["rows_written"] != summary["this_run"]["rows_in"]:
        raise RuntimeError(f"rows lost: {summary['this_run']}")
    return seconds


def on_fresh_cluster(args: argparse.Namespace, data: Path, out: Path, nodes: int) -> float:
    """``timed_run`` on a cluster of its own: a run is a job whose worker processes start anew, so it must
    not inherit the warm workers of the run before."""
    cluster, _, _ = start_cluster(worker_cpus=args.node_cpus, workers=nodes)
    try:
        return round(timed_run(args, data, out, nodes), 2)
    finally:
        ray.shutdown()
        cluster.shutdown()


def scaling_row(args: argparse.Namespace, inputs: dict[int, Path], work: Path, nodes: int) -> dict:
    """Seconds for each size with ``nodes`` nodes and the marginal rate between the two sizes."""
    seconds = {n: on_fresh_cluster(args, data, work / f"out{nodes}-{n}", nodes) for n, data in inputs.items()}
    (n1, t1), (n2, t2) = seconds.items()
    return {
        "nodes": nodes,
        "seconds": seconds,
        "marginal_images_per_s": round((n2 - n1) / (t2 - t1), 2) if t2 > t1 else None,
    }


def markdown(result: dict) -> str:
    sizes = result["num_images"]
    lines = [
        f"# Preprocess scaling in nodes: {result['preset']} at {result['resolution']} px ({result['date']})",
        "",
        f"{result['machine']}; load average {result['load_average_at_start'][0]:.2f} at start, "
        f"{result['load_average_at_end'][0]:.2f} at end. `{result['command']}`",
        "",
        "| nodes x CPUs | "
        + " | ".join(f"{n} images, s" for n in sizes)
        + " | marginal images/s | efficiency |",
        "|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for r in result["runs"]:
        times = " | ".join(str(r["seconds"][n]) for n in sizes)
        lines.append(
            f"| {r['nodes']} x {result['node_cpus']} | {times} | {r['marginal_images_per_s']} | {r['efficiency']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-images", type=int, nargs=2, default=[1024, 4096])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--node-cpus", type=int, default=2, help="logical CPUs of each worker node")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdray-scaling-"))
    result = {
        **run_header(__file__),
        "preset": args.preset,
        "resolution": args.resolution,
        "num_images": args.num_images,
        "node_cpus": args.node_cpus,
        "runs": [],
    }
    try:
        inputs = {
            n: write_synth(
                SynthConfig(num_images=n, resolution=args.resolution, rows_per_shard=64), work / f"in{n}"
            )
            for n in args.num_images
        }
        for nodes in args.nodes:
            row = scaling_row(args, inputs, work, nodes)
            print(row, flush=True)
            result["runs"].append(row)
        base = result["runs"][0]
        for r in result["runs"]:
            rates = (base["marginal_images_per_s"], r["marginal_images_per_s"])
            ideal = rates[0] * r["nodes"] / base["nodes"] if None not in rates else None
            r["efficiency"] = round(rates[1] / ideal, 2) if ideal else None
        result["load_average_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(f"preprocess_scaling_{args.preset}_{args.resolution}", result, markdown(result))


if __name__ == "__main__":
    main()
