"""The training workers' memory allocator (sdray/allocator.py): the environment that preloads Ray's jemalloc,
what a user set winning, the fallback where there is none, and a real Ray worker started with it."""

from __future__ import annotations

import logging

import pytest
from data_plan import remote_args_by_op

from sdray import allocator
from sdray.config import from_dict
from sdray.errors import ConfigError
from sdray.pipeline_config import load_pipeline_config
from sdray.train.config import TrainConfig


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)


def test_jemalloc_is_rays_own_library_kept_from_returning_memory(clean_env):
    library = allocator.ray_jemalloc()
    assert library is not None and library.name == "libjemalloc.so" and library.is_file()
    assert allocator.worker_env("jemalloc") == {
        "LD_PRELOAD": str(library),
        "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
    }
    assert allocator.worker_env("system") == {}
    assert TrainConfig().allocator == "jemalloc"


def test_what_the_user_set_wins(clean_env, monkeypatch):
    library = str(allocator.ray_jemalloc())
    monkeypatch.setenv("LD_PRELOAD", "/opt/profiler.so")
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")
    assert allocator.worker_env("jemalloc") == {
        "LD_PRELOAD": f"/opt/profiler.so:{library}",
        "MALLOC_CONF": "narenas:2",
    }
    monkeypatch.setenv("LD_PRELOAD", library)  # already preloaded: not twice
    assert allocator.worker_env("jemalloc")["LD_PRELOAD"] == library


def test_without_rays_jemalloc_the_system_allocator_runs_and_says_so(clean_env, monkeypatch, caplog):
    monkeypatch.setattr(allocator, "ray_jemalloc", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sdray.allocator"):
        assert allocator.worker_env("jemalloc") == {}
    assert "ships no libjemalloc.so; using the system's" in caplog.text


def test_an_unknown_allocator_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="allocator"):
        from_dict(TrainConfig, {"allocator": "tcmalloc"}, where="train")
    with pytest.raises(ConfigError, match=r"preprocess\.encode_allocator.*tcmalloc"):
        load_pipeline_config("tiny", ["preprocess.encode_allocator=tcmalloc"])


def test_a_ray_worker_started_with_it_runs_jemalloc_and_torch(ray_session, clean_env):
    @ray_session.remote
    def allocator_and_sum(size: int) -> tuple[str, float]:
        import torch

        total = 0.0
        for _ in range(3):  # large blocks freed and allocated again: what a training step does
            total += float(torch.ones(size).sum())
        return allocator.loaded_allocator(), total

    size = 16 * 1024**2  # 64 MB blocks, over glibc's largest heap allocation
    env = {"env_vars": allocator.worker_env("jemalloc")}
    assert ray_session.get(allocator_and_sum.options(runtime_env=env).remote(size)) == (
        "jemalloc",
        3.0 * size,
    )
    assert ray_session.get(allocator_and_sum.remote(size)) == ("system", 3.0 * size)


def test_a_worker_without_the_preload_it_was_given_says_so(caplog):
    assert allocator.loaded_allocator() == "system"  # pytest itself runs without the preload
    with caplog.at_level(logging.INFO, logger="sdray.allocator"):
        allocator.check_loaded("jemalloc", "rank 1", report=False)
        allocator.check_loaded("system", "rank 0", report=True)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "rank 1: allocator jemalloc is not loaded in this worker; running the system's"),
        ("INFO", "memory allocator: system"),
    ]


@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_both_training_stages_start_their_workers_with_the_configured_allocator(clean_env, choice):
    from cache_fixtures import TINY_INFO

    from sdray.models.config import ModelConfig
    from sdray.tracking.run import TrackingRun
    from sdray.train import run as unet_run
    from sdray.train.checkpoint import RunSpec
    from sdray.train.config import LossConfig
    from sdray.vae import train as vae_train
    from sdray.vae.config import VaeTrainConfig

    train = TrainConfig(loss=LossConfig(prediction_type="epsilon"), allocator=choice)
    spec = RunSpec(train=train, model=ModelConfig(), info=TINY_INFO)
    trainers = {
        "unet": unet_run._trainer(spec, {}, TrackingRun()),
        "vae": vae_train._trainer(VaeTrainConfig(allocator=choice), {}, None, None),
    }
    for stage, trainer in trainers.items():
        assert trainer.run_config.worker_runtime_env == {"env_vars": allocator.worker_env(choice)}, stage


@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_batch_generation_starts_its_sampler_actors_with_the_configured_allocator(
    ray_session, tmp_path, choice
):
    import pyarrow as pa

    from sdray.preprocess.dataset import build_generation_dataset
    from sdray.preprocess.manifest import OutputDir

    cfg = load_pipeline_config("tiny", [f"batch_generate.allocator={choice}"])
    ds = build_generation_dataset(cfg, pa.table({"id": ["a", "b"]}), OutputDir(str(tmp_path / "out")))
    ops = remote_args_by_op(ds)  # the plan as built, before anything runs
    assert ops["MapBatches(SamplerActor)"]["runtime_env"] == {"env_vars": allocator.worker_env(choice)}
    assert "runtime_env" not in ops["MapBatches(write_images)"]


@pytest.mark.parametrize("topology", ["split", "single"])
@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_serve_starts_its_model_replicas_with_the_configured_allocator(clean_env, choice, topology):
    """The model replicas get the allocator's environment (with the API key in the single topology, where
    the one replica is also the ingress); the split topology's ingress runs no model and gets only the key."""
    from sdray.models.config import ModelConfig
    from sdray.serve.app import build_app
    from sdray.serve.config import ServeConfig

    cfg = ServeConfig(allocator=choice, topology=topology)
    app = build_app(cfg, ModelConfig(), api_key="k")
    outer = app._bound_deployment  # Ray Serve's bound deployment: its options and init arguments
    key = {cfg.api_key_env: "k"}
    if topology == "single":
        assert outer.name == "SDServer"
        assert outer.ray_actor_options["runtime_env"] == {"env_vars": allocator.worker_env(choice) | key}
        return
    model = outer.init_args[0]._bound_deployment
    assert outer.name == "SDIngress" and model.name == "SDModel"
    assert outer.ray_actor_options["runtime_env"] == {"env_vars": key}
    if choice == "jemalloc":
        assert model.ray_actor_options["runtime_env"] == {"env_vars": allocator.worker_env("jemalloc")}
        assert "LD_PRELOAD" in model.ray_actor_options["runtime_env"]["env_vars"]
    else:  # nothing to set: the replica may reuse a worker process Ray already started
        assert "runtime_env" not in model.ray_actor_options
    assert ServeConfig().allocator == "jemalloc"
    with pytest.raises(ConfigError, match="serve.allocator"):
        from_dict(ServeConfig, {"allocator": "tcmalloc"}, where="serve")
