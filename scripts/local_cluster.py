"""A multi-node Ray cluster on one machine, running stage 1 and 2-worker stage 2 across its nodes.

    python scripts/local_cluster.py --workdir /tmp/sdray-cluster
    python scripts/local_cluster.py --workdir /tmp/sdray-cluster --kill preprocess,train
    AWS_ENDPOINT_URL_S3=... AWS_ACCESS_KEY_ID=... python scripts/local_cluster.py --workdir /tmp/x \\
        --data s3://bucket/input --out s3://bucket/run

The cluster (`ray.cluster_utils.Cluster`) has a head node with 0 CPUs, so nothing runs on it, and two
worker nodes with 3 (logical) CPUs each: preprocessing spreads the encoder actor and the decode tasks over
them; training puts one Ray Train worker (2 CPUs) on each, leaving a CPU per node for Ray Data's reads (with
no CPU left for them, the training data never arrives and the run hangs). Synthetic images are written to
`<workdir>/input` (or to `--data`, a local path or s3:// URI), the cache to `<out>/cache`, the run and the
exported model to `<out>/train`.

`--kill preprocess` removes the worker node running the encoder actor as soon as that actor is up, and adds
a fresh node (what the autoscaler does when a node dies); Ray Data restarts the actor and retries the lost
tasks, and if the stage fails anyway it is rerun, which resumes from the manifest. `--kill train` removes a
node running a training worker after the first checkpoint and adds a fresh one; Ray Train restarts the
workers from the last checkpoint (`FailureConfig`). The last line printed is a JSON report: rows in,
written, rejected, distinct ids across shards, attempts, final step, resumes, nodes hosting workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdray import storage
from sdray.data.synth import SynthConfig, write_synth
from sdray.pipeline_config import PipelineConfig, load_pipeline_config
from sdray.preprocess.manifest import OutputDir

log = logging.getLogger("local_cluster")
STEPS = 16
CHECKPOINT_EVERY = 4


def start_cluster(worker_cpus: int = 3, workers: int = 2):
    """A 0-CPU head and ``workers`` worker nodes; the driver connects to it."""
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": worker_cpus, "object_store_memory": 150 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 150 * 1024**2, "include_dashboard": False},
    )
    nodes = [cluster.add_node(**node) for _ in range(workers)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, nodes, node


def make_input(data: str, workdir: Path, rows: int, files: int) -> str:
    """Synthetic 64px scenes in ``files`` parquet files at ``data`` (local or object storage)."""
    synth = SynthConfig(num_images=rows, resolution=64, rows_per_shard=rows // files)
    local = write_synth(synth, workdir / "synth" if "://" in data else Path(data))
    if "://" in data:
        storage.publish_dir(str(local), data)
    return data if "://" in data else str(local)


def in_thread(fn, *args) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread (the main thread must stay free: `Cluster.add_node` needs it)."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # reported by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def kill_when(
    victim, thread: threading.Thread, cluster, nodes: list, node_args: dict, timeout: float
) -> bool:
    """Once ``victim()`` names a worker node, remove it and add a fresh one; False if the stage ended first."""
    deadline = time.monotonic() + timeout
    node = None
    while thread.is_alive() and node is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the stage made no progress to kill a node during")
        node = victim()
        time.sleep(0.2)
    if node is None:
        return False
    log.warning("removing worker node %s", node.node_id)
    nodes.remove(node)
    cluster.remove_node(node)
    nodes.append(cluster.add_node(**node_args))
    return True


def actor_nodes(nodes: list, class_name: str) -> list:
    """The worker nodes where an alive actor whose class name contains ``class_name`` runs."""
    from ray._private import state  # the GCS actor table; the state API would need the dashboard

    hosts = {
        a["Address"]["NodeID"]
        for a in state.actors().values()
        if a.get("State") == "ALIVE" and class_name in (a.get("ActorClassName") or "")
    }
    return [n for n in nodes if n.node_id in hosts]


def preprocess(cfg: PipelineConfig, cluster, nodes, node_args, *, kill: bool) -> dict[str, Any]:
    """Stage 1, with an optional node kill; reruns (resume) until done, at most 3 attempts."""
    from sdray.preprocess.run import run_preprocess

    killed, errors, at_kill = False, [], {}

    def victim():  # the encoder actor's node; records how many input files were committed at that moment
        node = next(iter(actor_nodes(nodes, "MapWorker")), None)
        if node is not None:
            at_kill["committed"] = len(OutputDir(cfg.preprocess.output).done())
        return node

    for _attempt in range(3):
        thread, outcome = in_thread(run_preprocess, cfg)
        if kill and not killed:
            killed = kill_when(victim, thread, cluster, nodes, node_args, timeout=300)
        thread.join()
        if "result" in outcome:
            result = {
                **outcome["result"],
                "node_killed": killed,
                "attempts": len(errors) + 1,
                "errors": errors,
            }
            return {**result, "committed_at_kill": at_kill.get("committed")}
        errors.append(f"{type(outcome['error']).__name__}: {str(outcome['error'])[:300]}")
        log.warning("preprocess attempt failed (%s); rerunning resumes it", errors[-1])
    raise RuntimeError(f"preprocess failed 3 times: {errors}")


def count_ids(cache_uri: str) -> tuple[int, int]:
    """(rows, distinct ids) over the shards the manifest lists: every accepted row should appear once."""
    out = OutputDir(cache_uri)
    ids: list[str] = []
    for record in out.done().values():
        for shard in record.shards:
            with out.fs.open_input_file(f"{out.root}/{shard}") as f:
                ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
    listed = out.fs.get_file_info(pafs.FileSelector(out.root))
    shards_on_disk = sum(1 for i in listed if i.base_name.startswith("part-"))
    listed_shards = sum(len(r.shards) for r in out.done().values())
    if shards_on_disk != listed_shards:
        raise RuntimeError(f"{shards_on_disk} shards in {cache_uri}, the manifest lists {listed_shards}")
    return len(ids), len(set(ids))


def train(cfg: PipelineConfig, cluster, nodes, node_args, *, kill: bool) -> dict[str, Any]:
    """Stage 2 with 2 workers, with an optional node kill after the first checkpoint."""
    from sdray.train import checkpoint
    from sdray.train.run import run_training

    run_dir = cfg.train.output
    fs, ray_dir = storage.resolve(storage.join(run_dir, "ray", "train"))

    def has_checkpoint() -> int:  # the step of the last checkpoint Ray Train registered (0: none yet)
        snapshot = f"{ray_dir}/checkpoint_manager_snapshot.json"
        if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
            return 0
        with fs.open_input_stream(snapshot) as f:
            try:
                text = f.read().decode()
                json.loads(text)
            except ValueError:  # caught mid-write
                return 0
        steps = [int(m) for m in re.findall(r"checkpoint-step-(\d{8})", text)]
        return max(steps, default=0)

    def logged_step() -> int:  # the last step in metrics.jsonl (train.log_every=1: appended every step)
        uri = storage.join(run_dir, "metrics.jsonl")
        rows = storage.read_bytes(uri).decode().splitlines() if storage.exists(uri) else []
        return json.loads(rows[-1])["step"] if rows else 0

    thread, outcome = in_thread(run_training, cfg.train, cfg.model)
    spread: list[int] = []
    at_kill: dict[str, int] = {}

    def victim():  # a node running a training worker, once steps past the first checkpoint are in flight
        checkpointed = has_checkpoint()
        if not checkpointed or logged_step() <= checkpointed:
            return None
        hosts = actor_nodes(nodes, "RayTrainWorker")
        spread.append(len(hosts))
        at_kill.update(step=logged_step(), checkpoint=checkpointed)
        return hosts[0] if hosts else None

    killed = kill_when(victim, thread, cluster, nodes, node_args, timeout=300) if kill else False
    thread.join(timeout=400)
    if thread.is_alive():
        raise TimeoutError("training did not finish within 400 s after the kill")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    from ray.train import Checkpoint

    saved = Checkpoint(storage.absolute(storage.join(run_dir, "ray", "train", Path(result.checkpoint).name)))
    with storage.checkpoint_files(saved) as d:
        state = checkpoint.read_shared_state(d)
    return {
        "step": result.step,
        "step_at_kill": at_kill.get("step"),
        "checkpoint_at_kill": at_kill.get("checkpoint"),
        "logged_steps": [
            json.loads(r)["step"]
            for r in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()
        ],
        "resumes": state["resumes"],
        "node_killed": killed,
        "worker_nodes": spread[-1] if spread else None,
        "model": result.model,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, type=Path, help="local scratch directory")
    parser.add_argument("--data", help="where to write the synthetic input (default <workdir>/input)")
    parser.add_argument("--out", help="where the cache and run go (default <workdir>/out); may be s3://")
    parser.add_argument(
        "--kill", default="", help="comma list of stages to kill a node during: preprocess,train"
    )
    parser.add_argument("--rows", type=int, default=48, help="synthetic images (default 48)")
    parser.add_argument("--files", type=int, default=6, help="input parquet files (default 6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    kills = {k for k in args.kill.split(",") if k}
    out = args.out or str(args.workdir / "out")
    data = make_input(args.data or str(args.workdir / "input"), args.workdir, args.rows, args.files)
    cfg = load_pipeline_config("tiny", [
        f"preprocess.input={data}", f"preprocess.output={storage.join(out, 'cache')}",
        "preprocess.decode_batch_size=8", "preprocess.encode_batch_size=8", "preprocess.rows_per_shard=8",
        f"train.data={storage.join(out, 'cache')}", f"train.output={storage.join(out, 'train')}",
        "train.num_workers=2", "train.cpus_per_worker=2", "train.batch_size=4", f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
        "train.max_failures=2",
    ])  # fmt: skip
    cluster, nodes, node_args = start_cluster()
    try:
        start = time.perf_counter()
        pre = preprocess(cfg, cluster, nodes, node_args, kill="preprocess" in kills)
        rows, distinct = count_ids(cfg.preprocess.output)
        pre_s = time.perf_counter() - start
        trained = train(cfg, cluster, nodes, node_args, kill="train" in kills)
        report = {
            "rows_in": pre["rows_in"], "rows_written": pre["rows_written"], "rows_rejected": pre["rows_rejected"],
            "shard_rows": rows, "distinct_ids": distinct, "preprocess_attempts": pre["attempts"],
            "preprocess_errors": pre["errors"], "preprocess_node_killed": pre["node_killed"],
            "preprocess_committed_at_kill": pre["committed_at_kill"],
            "preprocess_s": round(pre_s, 1), "train_s": round(time.perf_counter() - start - pre_s, 1),
            "expected_steps": STEPS, **{f"train_{k}": v for k, v in trained.items()},
        }  # fmt: skip
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
