"""Which memory allocator a model-running worker (training worker, preprocessing encoder actor, batch
generation sampler actor) runs on: jemalloc that keeps what it frees, or the system's.

A training step frees and allocates the same gigabytes again every step (activations, each backward's
gradients). glibc's malloc hands blocks over 32 MB, and freed memory at the top of its heaps, back to the
kernel, so every step faults those pages in again, 4 KB at a time. On a virtual machine that returns freed
guest memory to its host (free page reporting, as on the 2-core dev machine) such a fault costs up to tens of
microseconds: the sd15 UNet's step at 256 px, batch 2, faulted 1.7 million pages and took 27.6 s, against
7.3 s and no faults under jemalloc (3.8x; benchmarks/results/allocator.md). The sd15 encoders at 256 px
(VAE and text encoder, batch 16, inference) faulted 7 million pages a batch and ran at 0.8 images/s, against
1.1 under jemalloc (benchmarks/results/preprocess_allocator_sd15_256.md); the sd15 sampler's batch, 21.1 s
against 14.7 s (benchmarks/results/batchgen_allocator_sd15_256.md).

`jemalloc` preloads the jemalloc that Ray ships inside its wheel (`ray/core/libjemalloc.so`, the allocator
of Ray's own processes) into the Ray Train workers and those actors, configured never to return freed memory
(`dirty_decay_ms:-1,muzzy_decay_ms:-1`): after the first step nothing is faulted. The cost is that a worker
keeps its peak memory until it exits, which a training worker reaches at every step anyway. Settings the
user made win: an existing `MALLOC_CONF` is kept, and the library is added to an existing `LD_PRELOAD`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

Allocator = Literal["jemalloc", "system"]

RETAIN_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

log = logging.getLogger(__name__)


def ray_jemalloc() -> Path | None:
    """Ray's bundled jemalloc, or None where this Ray wheel has none."""
    import ray

    path = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return path if path.is_file() else None


def worker_env(allocator: Allocator) -> dict[str, str]:
    """Environment variables that give a worker process ``allocator`` (empty: the system's as it is)."""
    library = ray_jemalloc() if allocator == "jemalloc" else None
    if allocator == "jemalloc" and library is None:
        log.warning("allocator jemalloc: this Ray installation ships no libjemalloc.so; using the system's")
    if library is None:
        return {}
    preload = [entry for entry in os.environ.get("LD_PRELOAD", "").split(":") if entry]
    return {
        "LD_PRELOAD": ":".join(dict.fromkeys([*preload, str(library)])),
        "MALLOC_CONF": os.environ.get("MALLOC_CONF", RETAIN_CONF),
    }


def runtime_env(allocator: Allocator) -> dict[str, dict[str, str]]:
    """The Ray runtime_env of a worker or actor that runs ``allocator`` (Ray Train's worker_runtime_env,
    Ray Data's map_batches runtime_env)."""
    return {"env_vars": worker_env(allocator)}


def loaded_allocator() -> str:
    """'jemalloc' where this process has jemalloc mapped, else 'system' (read from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def check_loaded(wanted: Allocator, worker: str, *, report: bool) -> None:
    """In ``worker`` ("rank 1", "encoder actor"): warn where jemalloc was asked for and is not loaded (a node
    whose Ray lies elsewhere than the driver's: the dynamic loader skips a preload it cannot find); else
    log the allocator in use if ``report``."""
    loaded = loaded_allocator()
    if wanted == "jemalloc" and loaded != "jemalloc" and ray_jemalloc() is not None:
        log.warning("%s: allocator jemalloc is not loaded in this worker; running the system's", worker)
    elif report:
        log.info("memory allocator: %s", loaded)
