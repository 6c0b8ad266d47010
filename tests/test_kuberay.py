"""deploy/kuberay/ manifests against KubeRay's own CRD schemas (a pinned, trimmed copy; no cluster needed).

Beyond the schemas: every entrypoint is a documented sdray command whose flags and `--set` keys load into a
valid sdray config, training asks for as many workers as the GPU group has GPUs, the RayService's Serve config
passes Ray Serve's schema and sdray's config, and images, Ray versions and the token secret agree.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
SCHEMAS = json.loads((KUBERAY / "schemas" / "kuberay-crds.json").read_text())
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
TOKEN_SECRET = "sdray-ray-token"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def validator(kind: str) -> Draft202012Validator:
    """The pinned schema of ``kind``, with the shared `$defs` resolvable from it."""
    return Draft202012Validator(
        {"$defs": SCHEMAS["$defs"], "$ref": f"#/kinds/{kind}", "kinds": SCHEMAS["kinds"]}
    )


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]


def pod_specs(manifest: dict) -> list[dict]:
    cluster = cluster_spec(manifest)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def entrypoint_config(entrypoint: str):
    """Load the sdray config an entrypoint `python -m pipelines.STAGE --flags ...` would run with."""
    from sdray.pipeline_config import load_pipeline_config

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), entrypoint
    flags = importlib.import_module(argv[2]).FLAGS
    config, overrides, rest = "default", [], argv[3:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
        else:
            assert flag.startswith("--") and flag[2:] in flags, f"{argv[2]} has no flag {flag}"
            overrides.append(f"{flags[flag[2:]]}={value}")
    return load_pipeline_config(config, overrides)


def test_the_pinned_schemas_say_where_they_come_from():
    assert SCHEMAS["kuberay_version"] == "v1.7.0"
    assert re.fullmatch(r"[0-9a-f]{40}", SCHEMAS["commit"])
    assert SCHEMAS["source"].startswith("https://github.com/ray-project/kuberay/tree/v1.7.0/")
    assert set(SCHEMAS["kinds"]) == {"RayJob", "RayService"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kuberays_crd_schema(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(manifest["kind"]).iter_errors(manifest)
    ]
    assert not errors, errors


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replcas=2), "replcas"),
        (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="many"), "many"),
        (lambda m: m["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "tokens"),
        (lambda m: m["spec"].update(entrypoint=["python", "-m"]), "is not of type 'string'"),
        (
            lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(containrs=[]),
            "containrs",
        ),
    ],
)
def test_schema_catches_a_misspelt_key_or_a_wrong_type(mutate, message):
    manifest = copy.deepcopy(load("rayjob-train.yaml"))
    mutate(manifest)
    with pytest.raises(ValidationError, match=re.escape(message)):
        validator("RayJob").validate(manifest)


def test_all_pods_run_the_project_image_with_the_pinned_ray_and_token_auth():
    pinned = re.search(r'"ray\[[^]]*\]==([\d.]+)', (REPO / "pyproject.toml").read_text()).group(1).rstrip(".")
    base = re.search(r"^FROM (\S+)", (KUBERAY / "Dockerfile").read_text(), flags=re.M).group(1)
    assert (
        base == yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    )  # same env as ray up
    assert base.startswith(f"rayproject/ray:{pinned}")
    images = set()
    for path in MANIFESTS:
        manifest = yaml.safe_load(path.read_text())
        cluster = cluster_spec(manifest)
        assert cluster["rayVersion"].startswith(pinned), path.name
        assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}, path.name
        images |= {c["image"] for pod in pod_specs(manifest) for c in pod["containers"]}
    assert len(images) == 1  # built from deploy/kuberay/Dockerfile


def test_preprocess_job_runs_the_documented_command_on_object_storage():
    cfg = entrypoint_config(load("rayjob-preprocess.yaml")["spec"]["entrypoint"])
    assert cfg.preprocess.input.startswith("s3://") and cfg.preprocess.output.startswith("s3://")
    gpu_groups = [
        g for g in cluster_spec(load("rayjob-preprocess.yaml"))["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]  # fmt: skip
    assert cfg.preprocess.encode_concurrency <= sum(g["maxReplicas"] for g in gpu_groups)  # one GPU each


def test_train_job_uses_every_gpu_worker_and_object_storage_paths():
    manifest = load("rayjob-train.yaml")
    cfg = entrypoint_config(manifest["spec"]["entrypoint"])
    assert cfg.train.use_gpu and cfg.train.data.startswith("s3://") and cfg.train.output.startswith("s3://")
    (group,) = cluster_spec(manifest)["workerGroupSpecs"]
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.train.num_workers == group["replicas"] * gpus_per_pod == group["minReplicas"] * gpus_per_pod


def test_rayservice_serves_the_sdray_app_with_autoscaling_on_gpus():
    from ray.serve.schema import ServeDeploySchema

    from sdray.pipeline_config import load_pipeline_config

    manifest = load("rayservice.yaml")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "pipelines" / "serve.yaml").read_text()))
    (app,) = serve_config.applications
    assert app.import_path == local.applications[0].import_path
    cfg = load_pipeline_config(app.args["config"], app.args["overrides"])  # what app_builder loads
    assert cfg.model.path.startswith("s3://") and cfg.serve.num_gpus == 1
    model = next(d for d in app.deployments if d.name == "SDModel")
    assert model.ray_actor_options.num_gpus == cfg.serve.num_gpus
    scaling = model.autoscaling_config
    assert 0 <= scaling["min_replicas"] < scaling["max_replicas"]
    cluster = cluster_spec(manifest)
    assert cluster["enableInTreeAutoscaling"] is True  # pods follow the replicas
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"] and group["maxReplicas"] >= scaling["max_replicas"]
    for pod in pod_specs(manifest):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1" and "SDRAY_API_KEY" in env
