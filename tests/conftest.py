"""Shared fixtures: one local Ray instance per test session, tiny model components, a small synth data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdray.cluster import export_serve_fast_path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
export_serve_fast_path()  # as sdray's own local Ray (sdray.cluster.ensure_ray)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster, started once (never attaches to another cluster on the machine)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,  # logical CPUs: lets a CPU stage and an encoder actor run side by side on 2 cores
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sdray_forkserver(tmp_path_factory):
    """The socket of a preloaded `sdray` (tests/cli_forkserver.py) for the docs chains; stopped by its PID."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("forkserver")
    socket_path, log = folder / "sdray.sock", folder / "server.log"
    server_py = Path(__file__).with_name("cli_forkserver.py")
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(server_py), "serve", str(socket_path)],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
        )
    try:
        ready = server.stdout.readline()
        assert ready == "ready\n", f"the sdray fork server did not start: {log.read_text()[-3000:]}"
        yield socket_path
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared 2-core machine two intra-op threads wait on each other's
    time slices, and small ops crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_components():
    """All five tiny-preset components (random weights, seed 0). Do not mutate."""
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig

    return load_components(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_components, tmp_path_factory) -> Path:
    """The tiny preset saved as a diffusers-format directory."""
    from sdray.models.components import save_components

    return save_components(tiny_components, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """64 synthetic 64px scenes in 2 parquet shards."""
    from sdray.data.synth import SynthConfig, write_synth

    return write_synth(
        SynthConfig(num_images=64, resolution=64, rows_per_shard=32),
        tmp_path_factory.mktemp("data") / "synth",
    )


# `make test TEST_WORKERS=N` runs the suite on N xdist workers (`--dist loadfile`: a module's fixtures are
# built once); the docs chains are modules of their own, so they can run side by side. Longest modules first,
# so that the workers finish at about the same time (serial times on the 2-core CI machine, 2026-12-02).
LONGEST_FIRST = (
    "test_docs_finetune.py",
    "test_docs_quickstart.py",
    "test_jobs.py",
    "test_multinode.py",
    "test_demo.py",
    "test_lora_train.py",
    "test_faults.py",
    "test_buckets.py",
    "test_dreambooth.py",
    "test_tracking.py",
    "test_train.py",
    "test_docs_commands.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module stays in one piece
