"""The per-worker training function that Ray Train runs on every worker (numbered sections, top to bottom).

Data order and resume: with `train.loader: memory` (the default for caches up to `memory_loader_max_mb`,
and every bucketed cache) each worker holds the cache in memory and takes its batches from an epoch plan
that is a pure function of (seed, epoch, rows, batch size, workers) (sdray/train/bucket_batcher.py); a
checkpoint records the epoch and the micro-batches consumed, so a resumed run continues with exactly the
batches it would have had. With `loader: stream` each worker streams its shard of the cache with
`iter_torch_batches`, shuffled within a local buffer seeded by (seed, epoch, rank); on resume the worker
re-reads the epoch and skips the batches consumed. With one worker the cache is read in file order, so the
resume is exact too; with several, Ray splits blocks between workers dynamically, so within the interrupted
epoch some rows can be seen twice and others not at all; later epochs are whole.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sdray import allocator, storage
from sdray.data.cache import read_empty_caption
from sdray.data.reader import cache_shards
from sdray.models.components import load_components
from sdray.precision import autocast
from sdray.tracking.steps import WorkerTracking
from sdray.train import checkpoint, metrics
from sdray.train.bucket_batcher import BucketStore, bucket_micro_batches
from sdray.train.checkpoint import CLASS_DATASET, DIVERGED_FILE, RunSpec
from sdray.train.config import LossConfig, TrainConfig
from sdray.train.loss import (
    CachedBatch,
    diffusion_loss,
    draw_noise,
    paired_batch,
    prepare_batch,
    prior_preservation_loss,
)
from sdray.train.seeds import Stream, stream_seed
from sdray.train.state import StreamPosition, TrainingState, build_state

log = logging.getLogger(__name__)


def micro_batches(
    shard, cfg: TrainConfig, state: TrainingState | StreamPosition, rank: int
) -> Iterator[dict]:
    """Endless micro-batches of this worker's shard, epoch after epoch; keeps the data position in ``state``."""
    skip = state.batches_in_epoch
    while True:
        seen = 0
        for raw in shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,  # every step sees full, equal batches on every rank
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=stream_seed(cfg.seed, Stream.SHUFFLE, rank, state.epoch)
            if cfg.shuffle_buffer
            else None,
        ):
            seen += 1
            if seen <= skip:
                continue
            state.batches_in_epoch = seen
            yield raw
        if seen == 0:
            raise RuntimeError(f"rank {rank}: shard has fewer than batch_size={cfg.batch_size} rows")
        skip = 0
        state.epoch += 1
        state.batches_in_epoch = 0


@dataclass(frozen=True)
class Objective:
    """How one data item becomes a batch and a loss, chosen once per run: plain, or DreamBooth pairs."""

    prepare: Callable[[Any, torch.Generator], CachedBatch]
    """(item from the batch iterator, generator) -> the UNet's inputs."""
    loss: Callable[..., torch.Tensor]
    """diffusion_loss, or prior_preservation_loss with its weight bound."""


def make_objective(spec: RunSpec, empty_caption: torch.Tensor, loss_cfg: LossConfig) -> Objective:
    """Plain batches, or (instance, class) pairs when ``train.class_data`` is set (both caches share CacheInfo)."""
    prepare = functools.partial(prepare_batch, info=spec.info, empty_caption=empty_caption, cfg=loss_cfg)
    if not spec.train.class_data:
        return Objective(prepare=lambda raw, g: prepare(raw, generator=g), loss=diffusion_loss)
    return Objective(
        prepare=lambda pair, g: paired_batch(prepare(pair[0], generator=g), prepare(pair[1], generator=g)),
        loss=functools.partial(prior_preservation_loss, prior_loss_weight=spec.train.prior_loss_weight),
    )


def data_stream(
    spec: RunSpec, state: TrainingState, rank: int, world: int, device: torch.device
) -> Iterator[Any]:
    """This worker's micro-batches; with `class_data`, (instance, class) pairs from the two caches.

    `train.loader: memory` (always for a bucketed cache) reads the cache files into memory and draws
    batches from the seeded epoch plan (sdray/train/bucket_batcher.py); `stream` iterates Ray Data's shard.
    Both DreamBooth streams are endless and every rank takes one item per micro-batch, so all ranks run
    the same number of steps whatever the sizes of the two caches.
    """
    cfg = spec.train
    if cfg.loader == "memory":  # resolved by run_training: always memory for a bucketed cache

        def batches_of(path: str, position: TrainingState | StreamPosition, stream: int) -> Iterator[Any]:
            fs, shards = cache_shards(path)
            store = BucketStore.load(fs, shards, spec.info)
            return bucket_micro_batches(store, cfg, position, rank, world, device, stream=stream)

        batches = batches_of(cfg.data, state, 0)
        class_batches = batches_of(cfg.class_data, state.class_stream, 1) if cfg.class_data else None
    else:
        import ray.train

        batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, state, rank)
        class_batches = (
            micro_batches(ray.train.get_dataset_shard(CLASS_DATASET), cfg, state.class_stream, rank)
            if cfg.class_data
            else None
        )
    return batches if class_batches is None else zip(batches, class_batches, strict=True)


@dataclass
class StepRunner:
    """One optimizer step: grad-accumulated forward/backward, clip, AdamW, LR schedule, EMA."""

    spec: RunSpec
    state: TrainingState
    model: torch.nn.Module  # DDP-wrapped when world > 1
    scheduler: object
    empty_caption: torch.Tensor  # (77, D) on device
    device: torch.device
    world: int
    objective: Objective

    def step(self, batches: Iterator[dict]) -> tuple[float, float, float]:
        """Run one step; returns (loss averaged over ranks, grad norm, seconds waited for data)."""
        cfg, state = self.spec.train, self.state
        loss_cfg = cfg.loss  # resolved once when the run started (RunSpec)
        total, waited = torch.zeros((), device=self.device), 0.0
        for micro in range(cfg.grad_accum_steps):
            start = time.perf_counter()
            raw = next(batches)
            waited += time.perf_counter() - start
            batch = self.objective.prepare(raw, state.generator)
            draw = draw_noise(batch.latents, self.scheduler, loss_cfg, state.generator)
            last = micro == cfg.grad_accum_steps - 1
            no_sync = self.model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with no_sync:  # DDP all-reduces gradients only on the last micro-batch
                with autocast(cfg.mixed_precision, self.device):
                    loss = self.objective.loss(self.model, self.scheduler, batch, loss_cfg, draw)
                state.scaler.scale(loss / cfg.grad_accum_steps).backward()
            total += loss.detach() / cfg.grad_accum_steps
        if self.world > 1:  # every rank sees the same loss, so all stop together on NaN
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= self.world
        state.scaler.unscale_(state.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, max_norm)
        if torch.isfinite(total):
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.lr_scheduler.step()
            if state.ema is not None:
                state.ema.step(state.params)
        state.optimizer.zero_grad(set_to_none=True)
        return float(total), float(grad_norm), waited


def _publish(spec: RunSpec, state: TrainingState, rank: int, *, curve: bool) -> None:
    """Rank 0 appends the rows since the last call to the metrics file (and redraws the loss curve)."""
    if rank == 0 and state.unpublished:
        metrics.append_metrics(spec.train.output, state.unpublished)
        if curve:
            metrics.write_loss_curve(spec.train.output)
    state.unpublished = []


def _start(spec: RunSpec, rank: int, world: int, device: torch.device) -> StepRunner:
    """Build the state (or restore it from Ray's latest checkpoint) and wrap the UNet for DDP."""
    import ray.train
    import ray.train.torch

    state = build_state(spec.train, spec.model, device, rank)
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with storage.checkpoint_files(resumed) as directory:
            checkpoint.load_into(
                directory, state, rank, seed=spec.train.seed, origin=storage.checkpoint_uri(resumed)
            )
        state.resumes += 1
        log.info(
            "rank %d: resumed at step %d (epoch %d, batch %d)",
            rank,
            state.step,
            state.epoch,
            state.batches_in_epoch,
        )
    if rank == 0:  # rows logged after the checkpoint (or by an earlier run) are trained again: drop them
        metrics.truncate_metrics(spec.train.output, state.step)
    model = ray.train.torch.prepare_model(state.unet)  # DDP when world > 1; moves to the device
    scheduler = load_components(spec.model, ["scheduler"]).scheduler
    empty = torch.from_numpy(read_empty_caption(spec.train.data, spec.info)).to(device)
    objective = make_objective(spec, empty, spec.train.loss)
    return StepRunner(spec, state, model, scheduler, empty, device, world, objective)


def _after_step(runner: StepRunner, row: dict, rank: int, validator, tracking: WorkerTracking) -> None:
    """Checkpoint (every checkpoint_every and at the end) or report (every log_every); validate; track."""
    import ray.train

    spec, state, cfg = runner.spec, runner.state, runner.spec.train
    last = state.step == cfg.max_steps
    if state.step % cfg.checkpoint_every == 0 or last:
        _publish(spec, state, rank, curve=True)
        checkpoint.save(state, spec, rank, row)
    elif state.step % cfg.log_every == 0:
        _publish(spec, state, rank, curve=False)
        ray.train.report(row)
    tracking.log(state.step, row)
    if validator is not None and (last or (cfg.validate_every > 0 and state.step % cfg.validate_every == 0)):
        grid = validator.save(
            state.unet, state.ema, step=state.step, run_uri=cfg.output, resolution=spec.info.resolution
        )
        tracking.image(grid, step=state.step)


def train_worker(config: dict) -> None:
    """Ray Train entry: ``config`` is RunSpec.to_dict() (train + model config and cache metadata)."""
    spec = RunSpec.from_dict(config)
    cfg = spec.train
    import ray.train
    import ray.train.torch

    # 1. Process setup: threads, rank, device; the allocator is the worker's since its start (sdray.allocator).
    torch.set_num_threads(cfg.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    allocator.check_loaded(cfg.allocator, f"rank {rank}", report=rank == 0)

    # 2. Model, optimizer, LR schedule, EMA; resumed from the latest checkpoint if Ray has one.
    runner = _start(spec, rank, world, device)
    state = runner.state

    # 3. Data: this worker's micro-batches (streamed, or from the bucket batcher); rank 0 also validates.
    batches = data_stream(spec, state, rank, world, device)
    validator = None
    if rank == 0 and cfg.validate_every >= 0:
        from sdray.train.validation import Validator

        validator = Validator(cfg, spec.model, cfg.loss.prediction_type, device)

    # 4. Rank 0 tracks (MLflow/TensorBoard, see sdray.tracking) and shows progress; the others do neither.
    tracking = WorkerTracking(
        config,
        rank=rank,
        start_step=state.step,
        max_steps=cfg.max_steps,
        flush_every=cfg.log_every,
        name="train",
    )

    # 5. Training loop: step, stop on a non-finite loss, record, checkpoint or report, validate.
    while state.step < cfg.max_steps:
        start = time.perf_counter()
        loss, grad_norm, waited = runner.step(batches)
        if not math.isfinite(loss):
            _stop_diverged(spec, state, rank, loss)
            tracking.close()
            return
        state.step += 1
        timing = {
            "step_time_s": time.perf_counter() - start,
            "data_wait_s": waited,
            "samples": cfg.batch_size * cfg.grad_accum_steps * world,
        }
        lr = state.lr_scheduler.get_last_lr()[0]
        row = metrics.step_row(
            step=state.step, epoch=state.epoch, loss=loss, lr=lr, grad_norm=grad_norm, timing=timing
        )
        state.unpublished.append(row)
        _after_step(runner, row, rank, validator, tracking)
        tracking.step(state.step, loss=loss)

    # 6. End: the last step was checkpointed in the loop; publish the final metrics and loss curve, and
    # export the model from memory (the driver would read it back from the checkpoint: 3.4 GB for sd15).
    _publish(spec, state, rank, curve=True)
    if rank == 0 and cfg.export and state.step > 0:
        _export(spec, state)
    tracking.close()


def _export(spec: RunSpec, state: TrainingState) -> None:
    """Rank 0's export of the finished run (`train.export`). It changes the state (EMA's weights copied into
    the UNet, AdamW's moments dropped): nothing runs after it."""
    from sdray.train.export import write_export

    ema = state.ema if spec.train.export_ema else None
    # AdamW's moments (twice the UNet) are saved in the checkpoint: freed, they hold the frozen parts the
    # export loads, so the worker's peak memory does not grow
    state.optimizer.state.clear()
    write_export(spec, state.unet, state.params, ema, state.step, checkpoint.export_uri(spec.train))


def _stop_diverged(spec: RunSpec, state: TrainingState, rank: int, loss: float) -> None:
    """Record where the loss became non-finite and stop this worker without checkpointing the bad state."""
    log.error("rank %d: loss is %s at step %d; stopping", rank, loss, state.step + 1)
    if rank == 0:
        _publish(spec, state, rank, curve=True)
        status = {"step": state.step + 1, "loss": str(loss), "last_good_step": state.step}
        storage.write_bytes(storage.join(spec.train.output, DIVERGED_FILE), json.dumps(status).encode())
