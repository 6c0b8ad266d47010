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
from sdray.storage import checkpoint_files

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


def test_each_reader_of_a_remote_checkpoint_gets_its_own_copy(s3_server, tmp_path):  # noqa: F811
    """Ray's as_directory() shares one download directory per node and downloads into it again for a
    late reader, rewriting files an earlier reader still has open (a truncated training_state.pt on
    resume). Readers must not see each other's downloads."""
    from ray.train import Checkpoint

    saved = tmp_path / "saved"
    saved.mkdir()
    state = torch.randn(64, 1024)
    torch.save({"weights": state}, saved / "training_state.pt")
    s3_server.upload(saved, "checkpoints/step-8")
    remote = Checkpoint(f"{s3_server.bucket}/checkpoints/step-8", filesystem=s3_server.filesystem())

    with checkpoint_files(remote) as first:
        written = (first / "training_state.pt").stat().st_mtime_ns
        with checkpoint_files(remote) as second:
            assert second != first
            assert torch.equal(torch.load(second / "training_state.pt", weights_only=True)["weights"], state)
        assert (first / "training_state.pt").stat().st_mtime_ns == written  # not downloaded over
        assert torch.equal(torch.load(first / "training_state.pt", weights_only=True)["weights"], state)
    assert not first.exists() and not second.exists()  # temporary copies are removed


def test_local_checkpoint_is_read_in_place(tmp_path):
    from ray.train import Checkpoint

    with checkpoint_files(Checkpoint.from_directory(tmp_path)) as directory:
        assert directory == tmp_path
    assert tmp_path.exists()
