"""Driver side of tracking: open the MLflow run before `fit()` (or reopen it on resume), close it after export.

The run directory remembers its MLflow run in `tracking.json`, so rerunning the same command (a resume)
continues the same MLflow run; the workers get a `TrackingRun` (plain data) in their loop config. MLflow's
client is used directly rather than Ray's `setup_mlflow`, which starts a fresh run per call unless told the
run id: keeping that id across driver restarts is exactly what this module adds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdray import storage
from sdray.errors import ConfigError
from sdray.tracking.config import TrackingConfig
from sdray.tracking.guard import Guard, mlflow_client

log = logging.getLogger(__name__)

RUN_FILE = "tracking.json"
"""In the run directory: {"mlflow_uri", "run_id"} of the MLflow run that tracks it."""
CONFIG_KEY = "tracking"
"""Key of the TrackingRun dict in a Ray Train loop config."""
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@dataclass(frozen=True)
class TrackingRun:
    """Where the workers log: plain data, so Ray can ship it to them. Empty run_id = no MLflow."""

    mlflow_uri: str = ""
    run_id: str = ""
    tensorboard_dir: str = ""
    log_model: bool = True
    request_timeout_s: float = 10.0
    retry_after_s: float = 60.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrackingRun:
        return cls(**(data or {}))

    def guard(self) -> Guard:
        return Guard(f"MLflow at {self.mlflow_uri}", retry_after_s=self.retry_after_s)

    def client(self):
        return mlflow_client(self.mlflow_uri, timeout_s=self.request_timeout_s)


def resolve(cfg: TrackingConfig, output: str) -> TrackingRun:
    """The backends' locations for the run directory ``output`` (an absolute path or URI); no run yet."""
    local = "://" not in output
    uri = cfg.mlflow_uri
    if cfg.mlflow and not uri:
        if not local:
            raise ConfigError(
                f"tracking.mlflow with an object-store output ({output}) needs tracking.mlflow_uri (a server)"
            )
        uri = f"sqlite:///{Path(output, 'mlflow.db')}"
    board = cfg.tensorboard_dir or (str(Path(output, "tensorboard")) if cfg.tensorboard and local else "")
    if cfg.tensorboard and not board:
        raise ConfigError(f"tracking.tensorboard with output {output} needs a local tracking.tensorboard_dir")
    return TrackingRun(
        mlflow_uri=uri if cfg.mlflow else "",
        tensorboard_dir=board if cfg.tensorboard else "",
        log_model=cfg.log_model,
        request_timeout_s=cfg.request_timeout_s,
        retry_after_s=cfg.retry_after_s,
    )


def start_run(
    cfg: TrackingConfig, *, output: str, stage: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> TrackingRun:
    """Open (or, when ``output`` was tracked before, reopen) the MLflow run; log params and tags.

    ``tags`` come on top of `run_tags()` (git revision, run directory).

    Never raises for a tracking failure: a server that does not answer gives a warning and a run without
    MLflow (TensorBoard, if configured, still works).
    """
    run = resolve(cfg, output)
    if not run.mlflow_uri:
        return run
    opened = run.guard().call("opening the run", lambda: _open(cfg, run, output, stage, params, tags))
    return dataclasses.replace(run, run_id=opened or "")


def _open(
    cfg: TrackingConfig,
    run: TrackingRun,
    output: str,
    stage: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> str:
    from mlflow.entities import RunTag

    client = run.client()
    run_id = _previous_run(client, run.mlflow_uri, output)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: continuing run %s at %s", run_id, run.mlflow_uri)
    else:
        experiment = client.get_experiment_by_name(cfg.experiment)
        artifacts = (
            None if cfg.mlflow_uri else Path(output, "mlartifacts").as_uri()
        )  # else the server decides
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(cfg.experiment, artifacts)
        )
        name = cfg.run_name or Path(output.rstrip("/")).name
        run_id = client.create_run(experiment_id, run_name=name, tags={"sdray.stage": stage}).info.run_id
        record = {"mlflow_uri": run.mlflow_uri, "run_id": run_id}
        storage.write_bytes(storage.join(output, RUN_FILE), json.dumps(record).encode())
        log.info("MLflow: run %s (%s) at %s", name, run_id, run.mlflow_uri)
    _log_params(client, run_id, params)
    all_tags = {"sdray.output": output, **run_tags(), **tags}
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return run_id


def _previous_run(client, uri: str, output: str) -> str | None:
    """The run id in ``output``'s tracking.json if it names a live run on this tracking server."""
    from mlflow.exceptions import MlflowException

    path = storage.join(output, RUN_FILE)
    if not storage.exists(path):
        return None
    record = json.loads(storage.read_bytes(path))
    if record.get("mlflow_uri") != uri:
        return None
    try:
        found = client.get_run(record["run_id"])
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return found.info.run_id if found.info.lifecycle_stage == "active" else None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}``; lists and scalars as JSON text."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks; MLflow params are immutable, so a changed value is only warned about."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    flat = flatten(params)
    changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
    if changed:
        log.warning(
            "MLflow run %s keeps its first values of %s (params cannot change); this attempt's config is in "
            "the run directory",
            run_id, ", ".join(changed),
        )  # fmt: skip
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    for i in range(0, len(new), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=new[i : i + MAX_PARAMS_PER_CALL])


def git_revision() -> str:
    """The git commit of the sdray source tree (``+dirty`` when it has changes), or ``unknown``."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def run_tags() -> dict[str, str]:
    """Tags every tracked run gets: the code's git revision."""
    revision = git_revision()
    return {"sdray.git_revision": revision, "mlflow.source.git.commit": revision.split("+")[0]}


def finish_run(run: TrackingRun, *, model_uri: str | None = None, status: str = "FINISHED") -> None:
    """Upload the exported model directory (when local and ``log_model``) and mark the run ``status``."""
    if not run.run_id:
        return
    guard, client = run.guard(), run.client()
    if model_uri:
        guard.call("tagging the model", lambda: client.set_tag(run.run_id, "sdray.model_uri", model_uri))
        if run.log_model and "://" not in model_uri:
            guard.call("uploading the model", lambda: client.log_artifacts(run.run_id, model_uri, "model"))
    guard.call("closing the run", lambda: client.set_terminated(run.run_id, status))


@contextlib.contextmanager
def failure_status(run: TrackingRun) -> Iterator[None]:
    """Mark the MLflow run FAILED (KILLED on Ctrl-C) when the body raises; the error goes on."""
    try:
        yield
    except KeyboardInterrupt:
        finish_run(run, status="KILLED")
        raise
    except BaseException:
        finish_run(run, status="FAILED")
        raise
