"""Joining Ray from a stage's driver: the cluster in RAY_ADDRESS, or a private local Ray."""

from __future__ import annotations

import os
import signal
import threading


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it) or start a private local Ray.

    Never attaches to a cluster another process happens to run on this machine (address "local"). ray.init
    replaces the SIGTERM handler with one that exits at once; the caller's handler is put back, so the entry
    points still turn SIGTERM into KeyboardInterrupt and clean up partial outputs (exit code 130).
    """
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    address = os.environ.get("RAY_ADDRESS", "local")
    # Ray Train workers each reserve a logical CPU: on a 2-core machine two of them would leave none for
    # Ray Data's read tasks and the job would wait forever. A private local Ray therefore advertises at
    # least 4 logical CPUs (oversubscription is harmless: the workers mostly wait on each other).
    num_cpus = max(4, 2 * (os.cpu_count() or 1)) if address == "local" else None
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False)
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)
