"""TrackingConfig: where training runs are tracked. Light: imports no mlflow, torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class TrackingConfig:
    mlflow: bool = False
    """Track `train` and `train-vae` runs in MLflow: resolved config as params, per-step metrics, validation
    grids, the exported model, cache fingerprint and git revision as tags. A rerun continues the same run."""
    mlflow_uri: str = ""
    """MLflow tracking URI (`http://127.0.0.1:5000`, `sqlite:///abs/path.db`, ...); empty = a store inside the
    run directory: `<output>/mlflow.db` (SQLite; MLflow 3 refuses its old file store) + `<output>/mlartifacts`."""
    experiment: str = "sdray"
    """MLflow experiment name (created if missing)."""
    run_name: str = ""
    """MLflow run name; empty = the run directory's name."""
    log_model: bool = True
    """Upload the exported model directory as an MLflow artifact (an sd15 UNet is ~3.4 GB: consider false)."""
    tensorboard: bool = False
    """Write TensorBoard event files (`tensorboard --logdir <dir>`); a resumed run drops the steps it redoes."""
    tensorboard_dir: str = ""
    """Local directory of the event files; empty = `<output>/tensorboard`."""
    request_timeout_s: float = 10.0
    """Timeout of one MLflow HTTP request; a tracking server that fails is warned about, never fatal."""
    retry_after_s: float = 60.0
    """After a failed tracking call, skip that backend this long (metrics are kept and sent when it is back)."""

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.retry_after_s < 0:
            raise ConfigError("request_timeout_s must be > 0 and retry_after_s >= 0")
        if self.mlflow and not self.experiment:
            raise ConfigError("experiment must not be empty")

    @property
    def enabled(self) -> bool:
        return self.mlflow or self.tensorboard
