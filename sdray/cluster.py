"""Joining Ray from a stage's driver: the cluster in RAY_ADDRESS, or a private local Ray."""

from __future__ import annotations

import os
import signal
import threading

# Ray Serve's gRPC data plane (proxy -> replica and replica -> replica) instead of Ray actor calls; part of Ray's
# documented high-throughput mode. It cut the Serve overhead per request by 10-30% on the 2-core
# machine (docs/serve.md). gRPC's default 4 MiB message limit would turn any answer over 4 MiB (four 1024x1024
# PNGs are ~17 MB of JSON) into a 500, so replicas accept messages up to 1 GiB, as over Ray's object store.
# Ray's processes read these when they start: a private local Ray gets them here, a cluster sets them on every
# node (cluster.yaml).
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**30),
}


# Ray Train settings, handed from the driver to its controller and workers (a value set by the user wins):
# - the controller polls its workers every 2 s by default, and a run's start-up phases and its end wait for the
#   next poll: 3-5 s of a 2-step run on a running Ray (benchmarks/results/train_fixed_cost.md); a poll is one
#   small actor call per worker.
# - a preemption watcher actor per worker group relays node-drain notices to
#   `ray.train.get_preemption_info()`, which sdray does not read (a lost node is a worker failure: FailureConfig
#   restarts from the last checkpoint); the watcher is one more process per run, ~3 s of CPU to start.
TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def export_train_settings() -> None:
    """Put TRAIN_ENV in this process's environment (values already set win), before a trainer's fit()."""
    for name, value in TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def export_serve_fast_path() -> None:
    """Put SERVE_FAST_PATH_ENV in this process's environment (values already set win), before a local Ray
    starts: its processes inherit it."""
    for name, value in SERVE_FAST_PATH_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it) or start a private local Ray.

    Never attaches to a cluster another process happens to run on this machine (address "local"). ray.init
    replaces the SIGTERM handler with one that exits at once; the caller's handler is put back, so the entry
    points still turn SIGTERM into KeyboardInterrupt and clean up partial outputs (exit code 130). A SIGTERM
    while Ray starts (its handler's SystemExit) stops the half-started local Ray and is a KeyboardInterrupt.
    """
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    address = os.environ.get("RAY_ADDRESS", "local")
    local = address == "local"
    if local:
        export_serve_fast_path()
    num_cpus = local_cpus(os.cpu_count() or 1) if local else None
    # No dashboard on a private Ray (start-up time and memory on small machines), hence no state API.
    runtime_env = {"worker_process_setup_hook": "sdray.cluster.quiet_ray_train_chatter"} if local else None
    import psutil

    from sdray.console import quiet_log

    children_before = {child.pid for child in psutil.Process().children(recursive=True)}
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=quiet_log() is None,  # a quiet command leaves worker logs in Ray's session folder
        )
    except SystemExit:
        _stop_half_started_ray(children_before)
        raise KeyboardInterrupt from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_half_started_ray(children_before: set[int]) -> None:
    """Stop what an interrupted ray.init started: the child processes that were not there before it."""
    import psutil
    import ray

    ray.shutdown()
    children = [c for c in psutil.Process().children(recursive=True) if c.pid not in children_before]
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


def local_cpus(cores: int) -> int:
    """Logical CPUs a private local Ray advertises on a machine with ``cores`` cores.

    Ray Train workers each reserve a logical CPU: on a 2-core machine two of them would leave none for Ray
    Data's read tasks and the job would wait forever, so small machines advertise at least 4 (harmless
    oversubscription: the workers mostly wait on each other). Larger machines advertise their real cores:
    doubling them would run twice as many decode tasks as there are cores.
    """
    return max(4, cores)


def actor_threads(requested: int, actors: int) -> int:
    """Torch threads of one CPU actor of a pool of ``actors`` (encoders, samplers): ``requested``, or with 0
    this machine's cores shared by the pool's actors expected on it.

    Ray Data spreads an actor pool over the nodes (its default scheduling strategy is SPREAD), so on a cluster
    of M machines about actors / M run on each: dividing the cores by all of them would leave a node of a
    4-machine cluster with 4 actors using a quarter of its cores. The nodes of a local multi-node cluster share
    one machine, so they count once (machines are told apart by their address).
    """
    return requested or shared_cores(os.cpu_count() or 1, actors, cpu_machines())


def shared_cores(cores: int, actors: int, machines: int) -> int:
    """A machine's ``cores`` divided among the actors a pool of ``actors`` puts on each of ``machines``."""
    per_machine = -(-actors // max(machines, 1))
    return max(1, cores // per_machine)


def cpu_machines() -> int:
    """Machines (distinct node addresses) with CPUs in the running Ray cluster; 1 outside Ray."""
    import ray

    if not ray.is_initialized():
        return 1
    addresses = {
        node["NodeManagerAddress"]
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0
    }
    return max(1, len(addresses))


def quiet_ray_train_chatter() -> None:
    """Worker set-up hook of a private local Ray: silence two Ray Train messages that drown the progress.

    - The placement-group cleaner asks the state API (served by the dashboard, which a private Ray does not
      start) once a second whether the controller is alive, and warns on every failure. Placement groups are
      still removed: the private Ray ends with the driver.
    - Every `ray.train.report` is logged whole at INFO by each worker; sdray logs its own progress lines.
    """
    import importlib.util
    import logging

    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logging.getLogger(cleaner).setLevel(logging.ERROR)
    # That module names its logger by file path, so find the path without importing Ray Train here.
    context = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if context is not None and context.origin:
        logging.getLogger(context.origin).setLevel(logging.WARNING)
