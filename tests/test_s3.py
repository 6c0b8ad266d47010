"""Object storage without Ray (fast): a model directory on S3 (moto) is downloaded once per content version
and loaded like a local one; a missing one is named by its URI. The full S3 round trip through every stage
is in tests/test_multinode.py.
"""

from __future__ import annotations

import pytest
import torch
from s3_fixtures import s3_server  # noqa: F401 - fixture

from sdray.errors import InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig

S3_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):  # noqa: F811
    for key in S3_VARS:
        monkeypatch.setenv(key, s3_server.env[key])
    monkeypatch.setenv("SDRAY_CACHE_DIR", str(tmp_path / "model-cache"))
    return s3_server, tmp_path / "model-cache"


def test_model_on_s3_loads_like_the_local_directory(s3_env, tiny_model_dir, tiny_components):
    s3, cache = s3_env
    uri = s3.upload(tiny_model_dir, "models/tiny")
    loaded = load_components(ModelConfig(path=uri), ("unet", "scheduler"))
    for name, value in tiny_components.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], value), name
    assert loaded.scheduler.config.num_train_timesteps == tiny_components.scheduler.config.num_train_timesteps
    load_components(ModelConfig(path=uri), ("vae",))
    assert len(list(cache.iterdir())) == 1  # downloaded once, reused


def test_changed_model_on_s3_is_downloaded_again(s3_env, tiny_model_dir):
    s3, cache = s3_env
    uri = s3.upload(tiny_model_dir, "models/changing")
    load_components(ModelConfig(path=uri), ("scheduler",))
    s3.upload(tiny_model_dir / "scheduler" / "scheduler_config.json", "models/changing/scheduler/extra.json")
    load_components(ModelConfig(path=uri), ("scheduler",))
    assert len(list(cache.iterdir())) == 2  # the listing changed: a new copy, never a stale one


def test_missing_model_on_s3_is_named_by_its_uri(s3_env):
    s3, _ = s3_env
    with pytest.raises(InputError, match=f"model.path s3://{s3.bucket}/nothing/here: no unet/ folder"):
        load_components(ModelConfig(path=f"s3://{s3.bucket}/nothing/here"), ("unet",))
