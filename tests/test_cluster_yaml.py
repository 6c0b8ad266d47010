"""cluster.yaml must pass Ray's own cluster-config validation, so a typo fails CI (no cloud credentials needed)."""

import copy
import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def _validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_validates():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    _validate(config)
    groups = config["available_node_types"]
    assert config["head_node_type"] in groups
    workers = [g for name, g in groups.items() if name != config["head_node_type"]]
    assert workers and all(
        0 <= g["min_workers"] <= g["max_workers"] for g in workers
    )  # Ray checks only the sum
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_every_node_starts_ray_with_serves_fast_path():
    from sdray.cluster import SERVE_FAST_PATH_ENV

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        settings = start.split("ray start")[0]
        for name, value in SERVE_FAST_PATH_ENV.items():
            assert f"{name}={value} " in settings, (key, start)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_wrokers=3),  # top-level typo
        lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=20),  # more than max_workers
        lambda c: c.update(head_node_type="nope"),
        lambda c: c["available_node_types"]["cpu_worker"].update(max_workers="many"),
    ],
)
def test_validation_catches_mistakes(mutate):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    mutate(config)
    with pytest.raises((ValueError, jsonschema.ValidationError)):  # Ray raises one or the other
        _validate(config)


@pytest.mark.parametrize(("cores", "advertised"), [(1, 4), (2, 4), (4, 4), (8, 8), (64, 64)])
def test_private_ray_keeps_small_machines_workable_without_doubling_big_ones(cores, advertised):
    """2 cores need 4 logical CPUs (2 train workers + read tasks); 64 cores must not become 128 decode slots."""
    from sdray.cluster import local_cpus

    assert local_cpus(cores) == advertised


def test_every_node_gets_the_laptops_token_and_starts_ray_with_token_auth():
    """`ray job submit` from the laptop (RAY_AUTH_MODE=token, ~/.ray/auth_token) must match every node's token."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token " in start.split("ray start")[0], (key, start)


def test_sdrays_ray_train_settings_reach_the_controller_and_a_users_value_wins(monkeypatch):
    """sdray sets Ray Train's poll interval and turns its preemption watcher off in the driver; Ray Train must
    hand both on to its controller (a Ray upgrade that stops doing so would silently bring back the 2 s polls
    and the extra process per run)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, get_env_vars_to_propagate

    from sdray.cluster import TRAIN_ENV, export_train_settings

    assert TRAIN_ENV == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    assert set(TRAIN_ENV) <= ENV_VARS_TO_PROPAGATE
    for name in TRAIN_ENV:
        monkeypatch.delenv(name, raising=False)
    export_train_settings()
    assert {name: get_env_vars_to_propagate()[name] for name in TRAIN_ENV} == TRAIN_ENV
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    export_train_settings()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"


@pytest.mark.parametrize(
    ("cores", "actors", "machines", "threads"),
    [(16, 4, 4, 16), (16, 4, 1, 4), (16, 8, 4, 8), (16, 5, 4, 8), (2, 1, 1, 2), (2, 3, 1, 1)],
)
def test_a_spread_actor_pool_shares_each_machines_cores_among_the_actors_on_it(
    cores, actors, machines, threads
):
    """4 encoder actors spread over 4 machines each use all 16 cores (not 16 / 4); on one machine they share."""
    from sdray.cluster import shared_cores

    assert shared_cores(cores, actors, machines) == threads


def test_the_local_ray_is_one_machine_and_a_requested_thread_count_wins(ray_session):
    from sdray.cluster import actor_threads, cpu_machines

    assert cpu_machines() == 1
    assert actor_threads(0, 2) == max(1, (os.cpu_count() or 1) // 2)
    assert actor_threads(3, 2) == 3
