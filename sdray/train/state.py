"""TrainingState: everything a resumed run needs, as one object with state_dict()/load_state_dict().

The shared part (UNet, optimizer, LR schedule, EMA, gradient scaler, step, data position) is
identical on every DDP rank; the RNG part (this worker's noise generator and torch's global RNG) differs per
rank and is saved per rank. With `train.lora` only the adapter trains: the saved "unet" entry, the optimizer
and the EMA then hold the adapter's weights alone (the frozen base is rebuilt from the model config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params

from sdray.errors import InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.precision import autocast_dtype
from sdray.train import lora
from sdray.train.config import TrainConfig
from sdray.train.seeds import Stream, stream_seed


@dataclass
class StreamPosition:
    """Where a second data stream (DreamBooth's class images) stands: same fields as TrainingState's own."""

    epoch: int = 0
    batches_in_epoch: int = 0


@dataclass
class TrainingState:
    unet: UNet2DConditionModel
    """The plain module (not the DDP wrapper), on the training device."""
    params: list[torch.nn.Parameter]
    """The parameters that train (all of the UNet's, or the LoRA adapter's): optimizer, EMA and clipping."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    scaler: torch.amp.GradScaler
    """Loss scaling for fp16 autocast; disabled (a no-op) otherwise."""
    generator: torch.Generator
    """This worker's draws: posterior samples, caption dropout, noise, timesteps (CPU, seeded by rank)."""
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Passes over this worker's shard started before the current one."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (skipped again on resume)."""
    class_stream: StreamPosition = field(default_factory=StreamPosition)
    """Position in the class-image stream (DreamBooth prior preservation; unused otherwise)."""
    unpublished: list[dict[str, Any]] = field(default_factory=list)
    """Metrics rows of the steps since the last append to the metrics file (not checkpointed)."""
    resumes: int = 0
    """How many times this run was resumed from a checkpoint (worker restarts and command restarts)."""
    lora: bool = False
    """Only a LoRA adapter trains; "unet" in the state dict is the adapter's weights."""

    def state_dict(self) -> dict[str, Any]:
        """Shared state; see `rng_state_dict` for the per-rank part."""
        return {
            "unet": lora.adapter_state_dict(self.unet) if self.lora else self.unet.state_dict(),
            "lora": self.lora,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "class_stream": [self.class_stream.epoch, self.class_stream.batches_in_epoch],
            "resumes": self.resumes,
        }

    def rng_state_dict(self) -> dict[str, Any]:
        state = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(
        self, state: dict[str, Any], rng: dict[str, Any] | None = None, *, origin: str = "checkpoint"
    ) -> None:
        if bool(state.get("lora", False)) != self.lora:
            kinds = ("full fine-tuning", "a LoRA adapter")
            raise InputError(
                f"{origin}: saved by {kinds[not self.lora]} run, but train.lora.enabled is {self.lora}"
            )
        if self.lora:
            lora.load_adapter_state_dict(self.unet, state["unet"], origin=origin)
        else:
            self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(next(self.unet.parameters()).device)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.class_stream = StreamPosition(*(int(v) for v in state.get("class_stream", (0, 0))))
        self.resumes = int(state["resumes"])
        if rng is not None:
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


def _unet(
    cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device
) -> tuple[UNet2DConditionModel, list[torch.nn.Parameter]]:
    """The UNet on ``device`` in train mode, and its parameters that train (with LoRA: the adapter's)."""
    unet = load_components(model_cfg, ["unet"]).unet
    if cfg.lora.enabled:
        # Frozen weights only run forward: in the autocast dtype they take half the memory and are not cast
        # again at every step; the adapters stay fp32.
        dtype = autocast_dtype(cfg.mixed_precision, device)
        if dtype is not None:
            unet.to(device, dtype=dtype)
        lora.add_adapter(unet, cfg.lora, seed=stream_seed(cfg.seed, Stream.LORA_INIT, 0))
        cast_training_params(unet, dtype=torch.float32)
    elif model_cfg.path and device.type == "cpu":
        _own_memory(unet)
    unet.to(device)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, lora.trained_parameters(unet)


def _own_memory(module: torch.nn.Module) -> None:
    """Copy the parameters out of the model file: diffusers maps safetensors weights copy-on-write, and the
    first optimizer step would then copy every 4 KB page on a fault of its own (the sd15 UNet: 840,000 faults,
    8.1 s on the 2-core VM); one copy up front takes 3.3 s. Frozen weights (LoRA) stay mapped: read-only,
    they share the page cache across the workers of a machine."""
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.clone()


def build_state(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, rank: int) -> TrainingState:
    """A fresh state: UNet (identical on every rank; LoRA-adapted if configured), AdamW, LR schedule, EMA."""
    torch.manual_seed(stream_seed(cfg.seed, Stream.GLOBAL, rank))  # dropout, if the UNet has any
    unet, params = _unet(cfg, model_cfg, device)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused_adamw or None,  # None: torch picks (the per-parameter loop on a CPU)
    )
    lr_scheduler = get_scheduler(
        cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    ema = None
    if cfg.ema:
        ema = EMAModel(
            params,
            decay=cfg.ema_decay,
            use_ema_warmup=cfg.ema_warmup,
        )
        ema.to(device)
    scaler = torch.amp.GradScaler(
        device.type, enabled=cfg.mixed_precision == "fp16" and device.type == "cuda"
    )
    generator = torch.Generator("cpu").manual_seed(stream_seed(cfg.seed, Stream.GENERATOR, rank))
    return TrainingState(
        unet=unet,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        scaler=scaler,
        generator=generator,
        lora=cfg.lora.enabled,
    )
