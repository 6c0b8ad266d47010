"""Stage 2's one library function: train the UNet on a latent cache with Ray Train, then export the model.

Restarting with the same `train.output` resumes: Ray Train finds its run snapshot under the storage path and
hands the latest checkpoint to every worker (`ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import yaml

from sdray import allocator, storage
from sdray.cluster import export_train_settings
from sdray.data.cache import read_cache_info
from sdray.data.reader import ExpectedCache, open_cache
from sdray.errors import ConfigError, InputError, SdrayError
from sdray.models.config import ModelConfig, architecture
from sdray.tracking import run as tracking_run
from sdray.tracking.config import TrackingConfig
from sdray.train.bucket_batcher import SUMMARY_FILE, plan_summary
from sdray.train.checkpoint import (
    CLASS_DATASET,
    DIVERGED_FILE,
    RunSpec,
    export_uri,
    exported_step,
    refuse_to_replace_export,
)
from sdray.train.config import TrainConfig

log = logging.getLogger(__name__)

RUN_NAME = "train"
CONFIG_FILE = "train_config.yaml"


class TrainingDiverged(SdrayError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainResult:
    output: str
    """The run directory (absolute path or URI)."""
    step: int
    """Optimizer steps completed."""
    checkpoint: str | None
    """Path of the latest checkpoint inside the storage file system."""
    model: str | None
    """The exported diffusers model directory (full fine-tuning), if exported."""
    lora: str | None
    """The exported LoRA directory (`train.lora.enabled`), if exported."""
    metrics: dict[str, Any]
    """The metrics row of the last checkpointed step."""
    already_done: bool = False
    """The run was already at or past ``max_steps``: nothing was trained, nothing rewritten."""


def checkpoint_step(path: str) -> int:
    """The step in a ``checkpoint-step-*`` folder's name."""
    return int(path.rstrip("/").rpartition("-")[2])


def latest_checkpoint(storage_path: str) -> tuple[int, str] | None:
    """(step, URI) of the newest ``checkpoint-step-*`` folder of a run's Ray Train storage, if any."""
    import pyarrow.fs as pafs

    folder = storage.join(storage_path, RUN_NAME)
    if not storage.exists(folder):
        return None
    fs, path = storage.resolve(folder)
    steps = [
        (checkpoint_step(e.base_name), e.base_name)
        for e in fs.get_file_info(pafs.FileSelector(path))
        if e.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint-step-\d+", e.base_name)
    ]
    if not steps:
        return None
    step, name = max(steps)
    return step, storage.join(folder, name)


def _refuse_output_in_cache(data: str, output: str) -> None:
    """A run folder inside the cache (or the cache inside a run folder) mixes run files into the data set."""
    a, b = data.rstrip("/") + "/", output.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise ConfigError(
            f"train.output {output} and train.data {data} overlap: run files would land in the latent cache; "
            "give --out a folder of its own"
        )


def _already_done(cfg: TrainConfig) -> TrainResult | None:
    """The run in ``cfg.output`` when it is already at or past ``cfg.max_steps`` (nothing to train)."""
    latest = latest_checkpoint(cfg.storage_path)
    if latest is None or latest[0] < cfg.max_steps:
        return None
    if cfg.export and exported_step(cfg) != latest[0]:
        return None  # stopped between the last checkpoint and its export: the normal path exports
    exported = export_uri(cfg) if cfg.export else None
    return TrainResult(
        output=cfg.output,
        step=latest[0],
        checkpoint=latest[1],
        model=None if cfg.lora.enabled else exported,
        lora=exported if cfg.lora.enabled else None,
        metrics={},
        already_done=True,
    )


def expected_cache(cfg: TrainConfig, model_cfg: ModelConfig) -> ExpectedCache:
    """What the model needs from a cache; builds the encoders once to fingerprint them."""
    from sdray.models.components import load_components
    from sdray.models.fingerprint import encoder_fingerprint

    encoders = load_components(model_cfg, ("tokenizer", "text_encoder", "vae"))
    unet = architecture(model_cfg, "unet")
    return ExpectedCache(
        encoder_fingerprint=encoder_fingerprint(encoders),
        resolution=cfg.resolution or int(unet["sample_size"]) * encoders.vae_downsample,
        latent_channels=int(unet["in_channels"]),
        text_embed_dim=int(unet["cross_attention_dim"]),
        model_source=model_cfg.source,
    )


def open_class_cache(cfg: TrainConfig, expected: ExpectedCache, info: Any, class_info: Any = None) -> Any:
    """DreamBooth's class-image cache: encoded like the instance cache (``info``), enough rows for one step per
    worker. ``class_info``: its `_cache.json`, if already read."""
    where = f"train.class_data {cfg.class_data}"
    try:
        cache = open_cache(cfg.class_data, expected, class_info)
    except InputError as exc:
        raise InputError(f"prior preservation needs class images; {where}: {exc}") from None
    if cache.num_rows < cfg.batch_size * cfg.num_workers:
        raise InputError(
            f"prior preservation needs class images; {where} has {cache.num_rows} rows, one step needs "
            f"batch_size x num_workers = {cfg.batch_size * cfg.num_workers}"
        )
    fields = ("latent_shape", "text_embeds_shape", "has_std", "vae_scaling_factor", "resolution", "buckets")
    diffs = [
        f"{k} {getattr(cache.info, k)} vs {getattr(info, k)}"
        for k in fields
        if getattr(cache.info, k) != getattr(info, k)
    ]
    if diffs:
        raise InputError(
            f"{where} was preprocessed differently from train.data ({'; '.join(diffs)}); "
            "preprocess instance and class images with the same settings"
        )
    return cache


def check_lora(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse LoRA target modules the UNet lacks, on a weightless (meta device) UNet; no-op without LoRA."""
    if not cfg.lora.enabled:
        return
    import torch
    from diffusers import UNet2DConditionModel

    from sdray.train.lora import check_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(architecture(model_cfg, "unet"))
    check_targets(unet, cfg.lora.target_modules)


def _check_same_kind(output: str, cfg: TrainConfig) -> None:
    """A run directory resumes only as what it is: LoRA with the same adapter shape, or full fine-tuning."""
    uri = storage.join(output, CONFIG_FILE)
    if not storage.exists(uri):
        return
    try:
        before = RunSpec.from_dict(yaml.safe_load(storage.read_bytes(uri))).train.lora
    except (SdrayError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return  # unreadable: Ray Train's own checkpoint is the authority on resume
    now = cfg.lora
    shape = ("enabled", "rank", "target_modules")
    changed = [f"train.lora.{k}" for k in shape if getattr(before, k) != getattr(now, k)]
    if changed:
        raise ConfigError(
            f"{output} holds a run trained with other {', '.join(changed)} ({uri}); "
            "resume it with the same settings or choose another train.output"
        )


def _driver_progress(spec: RunSpec) -> contextlib.AbstractContextManager:
    """A quiet command does not show the workers' progress lines: follow the metrics file instead."""
    from sdray.console import quiet_log
    from sdray.train.metrics import progress_from_metrics

    if quiet_log() is None:
        return contextlib.nullcontext()
    return progress_from_metrics(spec.train.output, max_steps=spec.train.max_steps)


def _trainer(spec: RunSpec, datasets: dict[str, Any], tracked: tracking_run.TrackingRun):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdray.train.loop import train_worker  # here, not at the top: it imports diffusers (~8 s a process)

    cfg = spec.train
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = (
        True  # deterministic file order, so a resumed single worker replays its data exactly
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={**spec.to_dict(), tracking_run.CONFIG_KEY: tracked.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env=allocator.runtime_env(cfg.allocator),
        ),
        datasets=datasets,  # empty with the memory loader: the workers read the cache themselves
        dataset_config=DataConfig(execution_options=ingest),
    )


def ensure_exported(cfg: TrainConfig, latest: Any) -> str:
    """`export_uri(cfg)`, exported from the Ray checkpoint ``latest`` unless it already holds that step."""
    target = export_uri(cfg)
    if exported_step(cfg) != checkpoint_step(latest.path):
        from sdray.train.export import export_checkpoint

        log.info("exporting step %d from its checkpoint", checkpoint_step(latest.path))
        with storage.checkpoint_files(latest) as directory:
            export_checkpoint(directory, target, use_ema=cfg.export_ema)
    return target


def _raise_diverged(status_uri: str, result: Any) -> None:
    """Turn the workers' divergence record into an error naming the step and the checkpoint kept."""
    status = json.loads(storage.read_bytes(status_uri))
    latest = result.checkpoint
    kept = (
        f"last good checkpoint: {latest.path}, step {result.metrics.get('step')}"
        if latest
        else "no checkpoint was written"
    )
    raise TrainingDiverged(
        f"loss became {status['loss']} at step {status['step']}; training stopped ({kept}). "
        "Fix the cause (e.g. lower train.learning_rate, repair the cache) and rerun the command to resume."
    )


def write_plan_summary(output: str, counts: dict[str, int], cfg: TrainConfig) -> None:
    """`<output>/buckets.json`: what each epoch does with each bucket; warns about repeated buckets."""
    summary = plan_summary(counts, cfg.batch_size, cfg.num_workers)
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    for name in summary["repeated"]:
        info = summary["buckets"][name]
        log.warning(
            "bucket %s: %d rows, not a multiple of batch_size %d: %d row(s) repeated per epoch to fill its last "
            "batch", name, info["rows"], cfg.batch_size, info["repeated_rows"],
        )  # fmt: skip


def choose_loader(cfg: TrainConfig, *, bucketed: bool, num_bytes: int) -> str:
    """`train.loader` resolved for caches of ``num_bytes`` in all: "memory" or "stream" (see TrainConfig.loader)."""
    if bucketed:
        if cfg.loader == "stream":
            raise ConfigError(
                f"train.loader stream cannot read a bucketed cache ({cfg.data}); use auto or memory"
            )
        return "memory"
    if cfg.loader != "auto":
        return cfg.loader
    return "memory" if num_bytes <= cfg.memory_loader_max_mb * 2**20 else "stream"


def _open_data(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[TrainConfig, Any, dict[str, Any]]:
    """(cfg with the loader resolved, the opened cache, Ray Train datasets): the cache, and DreamBooth's class
    cache with `class_data`. With the memory loader there are no datasets: the workers read the files."""
    # read first: a wrong path fails before the encoders load (~10 s)
    infos = {uri: read_cache_info(uri) for uri in filter(None, (cfg.data, cfg.class_data))}
    expected = expected_cache(cfg, model_cfg)
    cache = open_cache(cfg.data, expected, infos[cfg.data])
    needed = cfg.batch_size * cfg.num_workers
    if cache.num_rows < needed:
        raise InputError(
            f"{cfg.data}: {cache.num_rows} rows, but one step needs batch_size x num_workers = {needed}"
        )
    caches = {"train": cache}
    if cfg.class_data:
        if cache.info.buckets:
            raise ConfigError(f"train.class_data (DreamBooth) needs a square cache; {cfg.data} is bucketed")
        caches[CLASS_DATASET] = open_class_cache(cfg, expected, cache.info, infos[cfg.class_data])
    num_bytes = sum(c.num_bytes for c in caches.values())
    loader = choose_loader(cfg, bucketed=bool(cache.info.buckets), num_bytes=num_bytes)
    log.info(
        "data loader: %s (%.1f MB of cache files; train.loader %s, memory_loader_max_mb %d)",
        loader, num_bytes / 2**20, cfg.loader, cfg.memory_loader_max_mb,
    )  # fmt: skip
    datasets = {name: c.stream() for name, c in caches.items()} if loader == "stream" else {}
    return dataclasses.replace(cfg, loader=loader), cache, datasets


def run_training(
    cfg: TrainConfig, model_cfg: ModelConfig, tracking: TrackingConfig | None = None
) -> TrainResult:
    """Train (or resume) the run in ``cfg.output`` and export the model; see docs/train.md.

    ``tracking``: MLflow / TensorBoard (sdray.tracking); a resumed run continues the same MLflow run.
    """
    # 1. Resolve paths: absolute local paths or URIs, the same strings on every node.
    if not cfg.data or not cfg.output:
        raise ConfigError("train.data (a latent cache) and train.output (the run directory) are required")
    output = storage.absolute(cfg.output)
    cfg = dataclasses.replace(
        cfg,
        data=storage.absolute(cfg.data),
        class_data=storage.absolute(cfg.class_data) if cfg.class_data else "",
        output=output,
        storage_path=storage.absolute(cfg.storage_path or storage.join(output, "ray")),
    )
    check_lora(cfg, model_cfg)
    _check_same_kind(output, cfg)
    _refuse_output_in_cache(cfg.data, output)
    if cfg.export:  # before training, not after it
        refuse_to_replace_export(export_uri(cfg), overwrite=False)
    done = _already_done(cfg)  # before train_config.yaml is rewritten: it must keep describing the run
    if done is not None:
        return done

    # 2. Open the cache(s) and refuse one made for another model or too small for one step.
    cfg, cache, datasets = _open_data(cfg, model_cfg)
    # 3. Resolve the objective once against the model's schedule (a misfit fails here, not in a worker).
    cfg = dataclasses.replace(cfg, loss=cfg.loss.resolve(architecture(model_cfg, "scheduler")))
    spec = RunSpec(train=cfg, model=model_cfg, info=cache.info)
    storage.write_bytes(
        storage.join(output, CONFIG_FILE), yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()
    )

    # 4. Fit; Ray restarts failed workers from the last checkpoint (FailureConfig).
    tracked = tracking_run.start_run(
        tracking or TrackingConfig(),
        output=output,
        stage="train",
        params=spec.to_dict(),
        tags={"sdray.cache_fingerprint": cache.info.encoder_fingerprint, "sdray.cache": cfg.data},
    )
    with tracking_run.failure_status(tracked):
        result = _fit_and_export(spec, cache, datasets, tracked)
    tracking_run.finish_run(tracked, model_uri=result.model or result.lora)
    return result


def _fit_and_export(
    spec: RunSpec, cache: Any, datasets: dict[str, Any], tracked: tracking_run.TrackingRun
) -> TrainResult:
    """Steps 4 and 5 of `run_training`: fit (resuming from Ray's latest checkpoint), then export."""
    cfg, output = spec.train, spec.train.output
    diverged_uri = storage.join(output, DIVERGED_FILE)
    storage.remove(diverged_uri)  # left by an earlier attempt; this one resumes from its last good checkpoint
    if cache.info.buckets:
        write_plan_summary(output, cache.bucket_counts, cfg)
    if cfg.materialize:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    export_train_settings()
    with _driver_progress(spec):
        result = _trainer(spec, datasets, tracked).fit()
    latest = result.checkpoint
    if storage.exists(diverged_uri):
        _raise_diverged(diverged_uri, result)

    # 5. The final weights, a diffusers model directory or the LoRA adapter's: rank 0 exported them from
    # memory when it finished; exported here from the last checkpoint where it did not (a worker lost after it).
    exported = ensure_exported(cfg, latest) if cfg.export and latest is not None else None
    step = int(result.metrics.get("step", 0)) if result.metrics else 0
    return TrainResult(
        output=output,
        step=step,
        checkpoint=latest.path if latest else None,
        model=None if cfg.lora.enabled else exported,
        lora=exported if cfg.lora.enabled else None,
        metrics=dict(result.metrics or {}),
    )
