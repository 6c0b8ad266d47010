"""Serve config (dataclass + Serve config file) and `sdray generate` (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import generate
from sdray.errors import ConfigError
from sdray.serve.config import ServeConfig

SERVE_YAML = Path(__file__).resolve().parent.parent / "pipelines" / "serve.yaml"


def test_serve_yaml_is_a_valid_serve_config_for_our_app():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from sdray.serve.app import SDIngress, SDModel, app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "sdray.serve.app:app_builder"
    assert {d.name for d in app.deployments} == {SDModel.name, SDIngress.name}
    for deployment in app.deployments:
        AutoscalingConfig(**deployment.autoscaling_config)  # raises on a bad key or value
    model = next(d for d in app.deployments if d.name == SDModel.name)
    assert model.max_ongoing_requests >= ServeConfig().max_batch_size
    assert app_builder(app.args) is not None  # the args resolve to a valid pipeline config
    from sdray.cluster import SERVE_FAST_PATH_ENV

    assert SERVE_FAST_PATH_ENV.items() <= app.runtime_env["env_vars"].items()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port must be in 1..65535"),
        ({"max_batch_size": 8, "max_ongoing_requests": 4}, "batches can never fill"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
        ({"dtype": "float16"}, "needs a GPU"),
        ({"default_scheduler": "lms"}, "default_scheduler 'lms' unknown; known: ddim"),
        ({"default_steps": 200}, "default_steps \\(200\\) > max_steps"),
        ({"downscale_to_zero_delay_s": -1}, "downscale_to_zero_delay_s must be >= 0, got -1"),
        ({"topology": "single", "min_replicas": 0}, "topology single .* cannot scale to zero"),
    ],
)
def test_bad_serve_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**kwargs)


def test_single_topology_is_one_deployment_with_the_model_replicas_resources_and_scaling():
    from sdray import allocator
    from sdray.models.config import ModelConfig
    from sdray.serve.app import SDServer, build_app

    cfg = ServeConfig(topology="single", num_cpus=2, min_replicas=1, max_replicas=3)
    app = build_app(cfg, ModelConfig(), api_key="k")
    deployment = app._bound_deployment
    assert (
        deployment.name == SDServer.name
        and deployment.max_ongoing_requests == cfg.ingress_max_ongoing_requests
    )
    assert (deployment.ray_actor_options["num_cpus"], deployment.ray_actor_options["num_gpus"]) == (2, 0)
    # the allocator's preload beside the key (tests/test_allocator.py: both allocators, both topologies)
    env = {**allocator.worker_env(cfg.allocator), cfg.api_key_env: "k"}
    assert deployment.ray_actor_options["runtime_env"] == {"env_vars": env}
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)


def test_grpc_message_limit_covers_the_largest_answer():
    """Serve's gRPC default (4 MiB) turned a 4 x 1024x1024 answer into a 500; sdray raises the limit."""
    from sdray.cluster import SERVE_FAST_PATH_ENV

    cfg = ServeConfig()
    noise_png = cfg.max_side**2 * 3 * 1.01 + 1024  # incompressible pixels: PNG is a little over raw
    largest_json = cfg.max_images * noise_png * 4 / 3 + 4096  # base64 in the JSON answer
    assert largest_json > 4 * 2**20
    assert int(SERVE_FAST_PATH_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 16 * largest_json


def test_min_replicas_zero_is_allowed():
    assert ServeConfig(min_replicas=0, max_replicas=2).min_replicas == 0


def test_generate_writes_the_sampler_image(tmp_path, tiny_model_dir, one_thread, capsys):
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    args = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--seed", "3", "--steps", "3"]
    rc = generate.main(
        [*args, "--size", "48x32", "--n", "2", "--scheduler", "ddim", "--out", str(tmp_path / "x.png")]
    )
    assert rc == 0
    assert "seed 4" in capsys.readouterr().out
    written = [np.asarray(Image.open(tmp_path / f"x-{i}.png")) for i in (0, 1)]
    sampler = Sampler(load_components(ModelConfig(path=str(tiny_model_dir))))
    req = GenerationRequest(
        prompt="a red circle",
        seeds=(3, 4),
        width=48,
        height=32,
        steps=3,
        guidance_scale=7.5,
        scheduler="ddim",
    )
    expected = sampler.generate([req])[0]
    for png, image in zip(written, expected, strict=True):
        assert png.shape == (32, 48, 3)
        np.testing.assert_array_equal(png, (image * 255).round().astype(np.uint8))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "red " * 90], "prompt: is 92 tokens; the text encoder takes at most 77"),
        (["--prompt", "a", "--size", "30x30"], "width: must be a multiple of 8"),
        (["--prompt", "a", "--size", "big"], "size: String should match pattern"),
        (["--prompt", "a", "--steps", "0"], "steps: Input should be greater than or equal to 1"),
    ],
)
def test_generate_bad_input_exits_2_naming_the_field(tmp_path, one_thread, capsys, extra, message):
    rc = generate.main([*extra, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:")
    assert not list(tmp_path.iterdir())


def test_generate_shows_step_progress_and_warns_far_from_native_size(tmp_path, one_thread, capsys):
    rc = generate.main(
        ["--prompt", "a", "--size", "256x64", "--steps", "2", "--out", str(tmp_path / "x.png")]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "note: 256x64 is 4x the model's native 64 px per side (4x the pixels per step)" in out
    assert "sampling: 100%" in out and "2/2" in out


def test_generate_names_a_missing_model_directory(tmp_path, capsys):
    assert generate.main(["--model", str(tmp_path / "nope"), "--prompt", "a", "--out", "x.png"]) == 2
    assert f"error: model.path {tmp_path / 'nope'}: does not exist" in capsys.readouterr().err
