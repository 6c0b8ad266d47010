"""Train (or fine-tune) the AutoencoderKL on images with Ray Train, then export it in diffusers format.

`train_vae` is the library entry: it builds the Ray Datasets, runs a TorchTrainer whose workers execute
`train_loop_per_worker` (DDP over `num_workers`, one checkpoint per report, resumed after a failure), and
exports `<output>/vae/` with a data-derived scaling factor. Every worker receives its settings as plain dicts
and rebuilds the typed configs on its first line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
import yaml
from diffusers.optimization import get_scheduler
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from sdray import allocator
from sdray.cluster import ensure_ray, export_train_settings
from sdray.config import from_dict, to_dict
from sdray.errors import InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.precision import autocast
from sdray.storage import checkpoint_files, report_checkpoint, write_text
from sdray.tracking import run as tracking_run
from sdray.tracking.config import TrackingConfig
from sdray.tracking.steps import WorkerTracking
from sdray.vae.config import VaeTrainConfig
from sdray.vae.data import PIXELS, check_data_path, image_datasets, to_model_input
from sdray.vae.export import STATE_FILE, export_vae
from sdray.vae.loss import Autoencode, psnr, reconstruct, vae_loss

log = logging.getLogger(__name__)


@dataclass
class VaeTrainState:
    """Everything a resumed run needs: model weights, optimizer, lr schedule, step, metric history."""

    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] | None = None

    def state_dict(self) -> dict:
        return {
            "vae": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "history": self.history or [],
        }

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.elapsed_s, self.history = state["step"], state["elapsed_s"], state["history"]


@dataclass(frozen=True)
class VaeTrainResult:
    """What a finished run produced."""

    vae_dir: Path
    psnr: float
    steps: int
    train_seconds: float
    scaling_factor: float
    history: list[dict]


def _batches(shard, cfg: VaeTrainConfig) -> Iterator[torch.Tensor]:
    """Endless (B, 3, R, R) float batches in [-1, 1], reshuffled every epoch."""
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed + epoch,
        ):
            count += 1
            yield to_model_input(batch[PIXELS])
        if count == 0:
            raise InputError(f"a worker got fewer than batch_size={cfg.batch_size} training images")
        epoch += 1


def _eval_images(val_shard, limit: int) -> torch.Tensor:
    """Up to ``limit`` held-out images, (N, 3, R, R) in [-1, 1], kept in memory for every evaluation."""
    chunks, count = [], 0
    for batch in val_shard.iter_torch_batches(batch_size=64):
        chunks.append(to_model_input(batch[PIXELS]))
        count += len(chunks[-1])
        if count >= limit:
            break
    if not chunks:
        raise InputError("no held-out images: raise vae_train.holdout_fraction or add data")
    return torch.cat(chunks)[:limit]


def _held_out_psnr(vae, images: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of posterior-mean reconstructions; the model is left in train mode."""
    vae.eval()
    values = [psnr(reconstruct(vae, chunk), chunk) for chunk in images.split(32)]
    vae.train()
    return float(torch.cat(values).mean())


def _report(state: VaeTrainState, metrics: dict, *, rank: int) -> None:
    """Append to the history and report; rank 0 attaches a checkpoint (the others' would be identical)."""
    state.history = [*(state.history or []), metrics]
    if rank != 0:
        ray.train.report(metrics)
        return
    report_checkpoint(metrics, lambda out: torch.save(state.state_dict(), out / STATE_FILE))


def optimizer_step(
    autoencode, images: torch.Tensor, cfg: VaeTrainConfig, generator: torch.Generator, state: VaeTrainState
) -> tuple[float, dict[str, float]]:
    """One AdamW step on the (B, 3, R, R) ``images``; returns the loss and its parts."""
    with autocast(cfg.mixed_precision, images.device):
        loss, parts = vae_loss(autoencode, images, cfg, generator)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.lr_scheduler.step()
    return loss.item(), parts


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. ``config``: {"vae_train": dict, "model": dict} (plain, picklable)."""
    # 1. typed configs and threads
    cfg = from_dict(VaeTrainConfig, config["vae_train"], where="vae_train")
    model_cfg = from_dict(ModelConfig, config["model"], where="model")
    torch.set_num_threads(cfg.threads_per_worker)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    allocator.check_loaded(cfg.allocator, f"rank {rank}", report=rank == 0)
    torch.manual_seed(cfg.seed + rank)

    # 2. model: built from the preset (same seed on every worker) or loaded to fine-tune; DDP when >1 worker
    vae = load_components(model_cfg, ["vae"]).vae.train()
    autoencode = prepare_model(Autoencode(vae))

    # 3. optimizer and learning-rate schedule
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else "cosine"
    lr_scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    state = VaeTrainState(vae, optimizer, lr_scheduler, history=[])

    # 4. resume from the last checkpoint, if Ray restarted us
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint_files(checkpoint) as ckpt_dir:
            state.load_state_dict(torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True))
        log.info("resumed at step %d", state.step)

    # 5. data: this worker's shard of the training images; every worker sees all held-out images. Rank 0
    #    also tracks (MLflow/TensorBoard, see sdray.tracking) and shows progress.
    batches = _batches(ray.train.get_dataset_shard("train"), cfg)
    eval_images = _eval_images(ray.train.get_dataset_shard("val"), cfg.max_eval_images)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + state.step)
    tracking = WorkerTracking(
        config, rank=rank, start_step=state.step, max_steps=cfg.max_steps, flush_every=1, name="vae"
    )

    # 6. loop: step, and every report_every steps evaluate, checkpoint and report
    sums, seen, started = {"loss": 0.0, "l1": 0.0, "mse": 0.0, "kl": 0.0}, 0, time.perf_counter()
    while state.step < cfg.max_steps:
        images = next(batches)  # (B, 3, R, R)
        loss, parts = optimizer_step(autoencode, images, cfg, generator, state)
        state.step += 1
        for key, value in {"loss": loss, **parts}.items():
            sums[key] += value
        seen += 1
        tracking.step(state.step, loss=loss)
        if state.step % cfg.report_every and state.step < cfg.max_steps:
            continue
        now = time.perf_counter()
        state.elapsed_s += now - started
        metrics = {"step": state.step, **{k: v / seen for k, v in sums.items()}}
        metrics |= {"psnr": _held_out_psnr(vae, eval_images), "lr": lr_scheduler.get_last_lr()[0]}
        metrics |= {"elapsed_s": state.elapsed_s, "images_per_s": seen * len(images) / (now - started)}
        _report(state, metrics, rank=rank)
        tracking.log(state.step, metrics)
        if cfg.target_psnr and metrics["psnr"] >= cfg.target_psnr:
            break  # every worker computed the same PSNR on the same images, so all stop together
        sums, seen, started = dict.fromkeys(sums, 0.0), 0, time.perf_counter()
    tracking.close()


def _check_sizes(cfg: VaeTrainConfig, num_train: int, num_val: int) -> None:
    if num_val == 0:
        raise InputError(f"{cfg.data}: no held-out images; raise vae_train.holdout_fraction or add data")
    if num_train < cfg.num_workers * cfg.batch_size:
        raise InputError(
            f"{cfg.data}: {num_train} training images, fewer than num_workers x batch_size "
            f"= {cfg.num_workers * cfg.batch_size}"
        )
    log.info("VAE data: %d training and %d held-out images", num_train, num_val)


def train_vae(
    cfg: VaeTrainConfig, model_cfg: ModelConfig, tracking: TrackingConfig | None = None
) -> VaeTrainResult:
    """Train the VAE on ``cfg.data`` and export ``cfg.output/vae`` (diffusers format, safetensors).

    Also writes ``cfg.output/config.yaml`` (the resolved settings) and ``cfg.output/metrics.json``
    (history of {step, loss, l1, mse, kl, psnr, lr, elapsed_s, images_per_s} and the final numbers).
    ``tracking``: MLflow / TensorBoard (sdray.tracking).
    """
    if not cfg.output:
        raise InputError("vae_train.output is empty: give a run directory (--out)")
    check_data_path(cfg)
    output = Path(cfg.output).absolute()
    output.mkdir(parents=True, exist_ok=True)
    ensure_ray()  # join RAY_ADDRESS (`ray job submit` sets it) or start a private local Ray
    resolved = {"vae_train": to_dict(cfg), "model": to_dict(model_cfg)}
    write_text(output / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    train_ds, val_ds = image_datasets(cfg)
    if cfg.materialize:
        _check_sizes(cfg, train_ds.count(), val_ds.count())
    tracked = tracking_run.start_run(
        tracking or TrackingConfig(), output=str(output), stage="train-vae", params=resolved, tags={}
    )
    export_train_settings()
    with tracking_run.failure_status(tracked):
        result = _trainer(
            cfg, {**resolved, tracking_run.CONFIG_KEY: tracked.to_dict()}, train_ds, val_ds
        ).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"VAE training reported no checkpoint (error: {result.error})")
        with checkpoint_files(result.checkpoint) as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True)
        vae_dir, scaling = export_vae(state["vae"], model_cfg, cfg, train_ds, output / "vae")
    tracking_run.finish_run(tracked, model_uri=str(vae_dir))
    final = state["history"][-1]
    summary = {"psnr": final["psnr"], "steps": state["step"], "train_seconds": state["elapsed_s"]}
    summary |= {"scaling_factor": scaling, "history": state["history"]}
    write_text(output / "metrics.json", json.dumps(summary, indent=2))
    log.info("VAE: %.2f dB held-out PSNR after %d steps (%.0f s); exported %s", final["psnr"], state["step"],
             state["elapsed_s"], vae_dir)  # fmt: skip
    return VaeTrainResult(
        vae_dir, final["psnr"], state["step"], state["elapsed_s"], scaling, state["history"]
    )


def _trainer(cfg: VaeTrainConfig, loop_config: dict, train_ds, val_ds) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.threads_per_worker},
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name="vae",
            storage_path=str(Path(cfg.output).absolute() / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env=allocator.runtime_env(cfg.allocator),
        ),
    )
