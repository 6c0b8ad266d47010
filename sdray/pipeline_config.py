"""PipelineConfig: one YAML file holds every stage's section; all are validated whichever stage runs.

A section absent from the file takes its defaults. Unknown sections or keys, and values of the wrong type,
raise ConfigError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdray import storage
from sdray.batchgen.config import BatchGenerateConfig
from sdray.config import apply_overrides, from_dict, load_yaml
from sdray.data.synth import SynthConfig
from sdray.dreambooth.config import DreamBoothConfig
from sdray.errors import ConfigError
from sdray.models.config import ARCHITECTURE_PARTS, ModelConfig, saved_architecture
from sdray.preprocess.config import PreprocessConfig
from sdray.serve.config import ServeConfig
from sdray.tracking.config import TrackingConfig
from sdray.train.config import TrainConfig
from sdray.vae.config import VaeTrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
DEFAULT_CONFIG = "tiny"


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model components to build or load (shared by all stages)."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """`sdray data synth`: the synthetic captioned data set."""
    vae_train: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    """`sdray train-vae`: train or fine-tune the VAE (skip it with a pretrained VAE)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """`sdray preprocess`: stage 1."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """`sdray train`: stage 2."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`sdray serve` / `sdray generate`: stage 3."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking of `sdray train` and `sdray train-vae` (MLflow, TensorBoard); see docs/train.md."""
    batch_generate: BatchGenerateConfig = field(default_factory=BatchGenerateConfig)
    """`sdray batch-generate`: offline generation over prompt files (request limits from `serve`)."""
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    """`sdray dreambooth`: subject images + class prior -> caches -> training (settings from the other sections)."""


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or the name of a packaged config (`tiny`, `sd15`, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a packaged config ({known})")


class Override(str):
    """A ``section.key=value`` override that knows the command-line flag it came from (for messages)."""

    source: str

    def __new__(cls, item: str, source: str) -> Override:
        override = super().__new__(cls, item)
        override.source = source
        return override


def load_pipeline_config(
    name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> PipelineConfig:
    """Read a YAML config, apply ``section.key=value`` overrides, and validate every section.

    An error is blamed on the first override (an :class:`Override` names its flag) that turns a valid
    config into an invalid one, else on the file.
    """
    path = resolve_config_path(name_or_path)
    base = load_yaml(path)
    overrides = overrides or []
    try:
        cfg = _validated(base, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{_culprit(base, overrides) or path}: {exc}") from None
    if not cfg.model.path:
        return cfg
    # Ray workers and Serve replicas may run in another working directory (a cluster the command attached to)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=storage.absolute(cfg.model.path))
    )


def _validated(base: dict[str, Any], overrides: list[str]) -> PipelineConfig:
    data = apply_overrides(base, overrides)
    _model_path_wins(data, overrides)
    return from_dict(PipelineConfig, data, where="")


def _culprit(base: dict[str, Any], overrides: list[str]) -> str | None:
    """The source of the first override whose addition makes the config invalid (None: the file's fault)."""
    for count in range(len(overrides) + 1):
        try:
            _validated(base, overrides[:count])
        except ConfigError:
            if count == 0:
                return None
            item = overrides[count - 1]
            return getattr(item, "source", None) or f"override {item.partition('=')[0]}"
    return None


def _model_path_wins(data: dict[str, Any], overrides: list[str]) -> None:
    """With `model.path` set, the directory's architecture replaces the preset's size overrides in ``data``.

    Overrides from the config file are dropped; ones given with ``--set`` are checked against the
    directory's saved config and refused if they differ (they would be silently ignored otherwise).
    """
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("path"):
        return
    explicit = apply_overrides({}, [o for o in overrides if o.strip().startswith("model.")]).get("model", {})
    for part in ARCHITECTURE_PARTS:
        given = explicit.get(part) or {}
        if given:
            saved = saved_architecture(str(model["path"]), part)
            for key, value in given.items():
                if key not in saved or _plain(saved[key]) != _plain(value):
                    raise ConfigError(
                        f"--set model.{part}.{key}={value!r} conflicts with model.path {model['path']}, whose "
                        f"{part} has {key}: {saved.get(key, '(not set)')!r}; a model directory holds its own "
                        "architecture: drop the override"
                    )
        model[part] = {}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
