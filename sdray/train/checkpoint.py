"""Training checkpoints: a directory per save, reported to Ray Train, which keeps the last K in storage.

Layout of one checkpoint (Ray merges the files every rank reports into one directory):

    training_state.pt    shared TrainingState.state_dict() (rank 0): unet, optimizer, lr schedule, EMA, step,
                         data position (metrics rows live in the run's metrics.jsonl, not here); with
                         train.lora the unet, optimizer and EMA entries hold the adapter's weights only
    rng-rank{R}.pt       each rank's RNG states
    run.yaml             the resolved train + model config
    cache_info.json      CacheInfo of the data trained on
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from sdray import storage
from sdray.config import from_dict, to_dict
from sdray.data.cache import CacheInfo
from sdray.errors import ConfigError, InputError, SdrayError
from sdray.models.config import TRAIN_INFO_FILE, ModelConfig
from sdray.models.lora import INFO_FILE as LORA_INFO_FILE
from sdray.train.config import TrainConfig
from sdray.train.seeds import Stream, stream_seed

if TYPE_CHECKING:  # not at run time: the training driver stays free of diffusers (seconds per process)
    from sdray.train.state import TrainingState

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
RUN_FILE = "run.yaml"
INFO_FILE = "cache_info.json"
DIVERGED_FILE = "diverged.json"
"""In the run directory: the workers' record of a NaN/inf loss (step, last good checkpoint)."""
CLASS_DATASET = "class"
"""The Ray Train dataset name of DreamBooth's class-image cache."""
MODEL_DIR = "model"
"""In the run directory: the exported diffusers model of a full fine-tuning run."""
LORA_DIR = "lora"
"""In the run directory: the exported adapter of a `train.lora` run."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step:08d}"


@dataclass(frozen=True)
class RunSpec:
    """The configs a worker runs with; saved in every checkpoint so export needs nothing else."""

    train: TrainConfig
    """With the objective resolved (`train.loss.prediction_type` set): see LossConfig.resolve."""
    model: ModelConfig
    info: CacheInfo

    def __post_init__(self) -> None:
        if not self.train.loss.prediction_type:
            raise ConfigError("the run spec's objective is unresolved (train.loss.prediction_type is empty)")

    def to_dict(self) -> dict[str, Any]:
        return {"train": to_dict(self.train), "model": to_dict(self.model), "cache_info": to_dict(self.info)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        train = from_dict(TrainConfig, data["train"], where="train")
        model = from_dict(ModelConfig, data["model"], where="model")
        return cls(train=train, model=model, info=CacheInfo.from_dict(data["cache_info"]))


def write_checkpoint_dir(out: Path, state: TrainingState, spec: RunSpec, rank: int) -> None:
    """Write this rank's share of a checkpoint into ``out`` (a local temp directory)."""
    if rank == 0:
        torch.save(state.state_dict(), out / STATE_FILE)
        (out / RUN_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        (out / INFO_FILE).write_text(spec.info.to_json())
    torch.save(state.rng_state_dict(), out / rng_file(rank))


def export_uri(cfg: TrainConfig) -> str:
    """Where a run's model is exported: ``<output>/model``, or ``<output>/lora`` with `train.lora`."""
    return storage.join(cfg.output, LORA_DIR if cfg.lora.enabled else MODEL_DIR)


def exported_step(cfg: TrainConfig) -> int | None:
    """The training step of the export in `export_uri(cfg)`, or None where there is none (or it is unreadable)."""
    info = storage.join(export_uri(cfg), LORA_INFO_FILE if cfg.lora.enabled else TRAIN_INFO_FILE)
    if not storage.exists(info):
        return None
    try:
        step = yaml.safe_load(storage.read_bytes(info)).get("step")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def refuse_to_replace_export(out_uri: str, *, overwrite: bool) -> None:
    """Refuse to export into ``out_uri`` when it is a non-empty folder other than an earlier sdray export (of
    a full fine-tuning or a LoRA run), unless ``overwrite``."""
    if any(storage.exists(storage.join(out_uri, marker)) for marker in (TRAIN_INFO_FILE, LORA_INFO_FILE)):
        return
    storage.refuse_to_replace(out_uri, marker=TRAIN_INFO_FILE, what="an sdray export", overwrite=overwrite)


def save(state: TrainingState, spec: RunSpec, rank: int, metrics: dict[str, Any]) -> None:
    """Report ``metrics`` with a checkpoint of ``state`` (every rank must call this; it is a barrier)."""
    write = functools.partial(write_checkpoint_dir, state=state, spec=spec, rank=rank)
    storage.report_checkpoint(metrics, write, checkpoint_name(state.step))
    log.info("rank %d: checkpoint at step %d", rank, state.step)


def load_into(
    directory: str | Path, state: TrainingState, rank: int, *, seed: int = 0, origin: str | None = None
) -> None:
    """Restore ``state`` from a checkpoint directory; a rank without saved RNG is re-seeded from (``seed``,
    rank, step).

    ``origin`` names the checkpoint in errors when ``directory`` is a downloaded copy of it.
    """
    directory = Path(directory)
    origin = origin or str(directory)
    device = next(state.unet.parameters()).device
    shared = _load(directory / STATE_FILE, f"{origin}/{STATE_FILE}", device)
    rng_path = directory / rng_file(rank)
    rng = _load(rng_path, f"{origin}/{rng_file(rank)}", "cpu") if rng_path.is_file() else None
    state.load_state_dict(shared, rng, origin=f"{origin}/{STATE_FILE}")
    if rng is None:  # the run was resumed with more workers than it was saved with
        log.warning("rank %d: no RNG state in %s; reseeding from the step", rank, origin)
        state.generator.manual_seed(stream_seed(seed, Stream.RESEED, rank, state.step))


def _load(path: Path, name: str, device: torch.device | str) -> dict[str, Any]:
    """torch.load of tensors and plain data only; a truncated or foreign file is an InputError naming it."""
    try:
        # mmap: tensors are read when used (export reads sd15's 3.4 GB of UNet weights, not the 10 GB file)
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise InputError(f"{name}: unreadable checkpoint file ({reason})") from exc


def read_spec(directory: str | Path) -> RunSpec:
    """The RunSpec saved in a checkpoint directory."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not an sdray training checkpoint (no {RUN_FILE})")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    missing = [
        key for key in ("train", "model", "cache_info") if not isinstance(data, dict) or key not in data
    ]
    if missing:
        raise InputError(f"{path}: not an sdray run file (missing: {', '.join(missing)})")
    try:
        return RunSpec.from_dict(data)
    except SdrayError as exc:
        raise InputError(f"{path}: {exc}") from exc
    except KeyError as exc:
        raise InputError(f"{path}: cache_info has no {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: bad cache_info ({exc})") from exc


def read_shared_state(directory: str | Path) -> dict[str, Any]:
    """The shared TrainingState dict on the CPU (for export)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise InputError(f"{directory}: checkpoint has no {STATE_FILE}")
    return _load(path, str(path), "cpu")
