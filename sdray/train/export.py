"""Export a training checkpoint as a diffusers-format model directory, or a LoRA directory (safetensors).

A full fine-tuning run's directory holds the trained UNet (EMA weights by default) plus the frozen
tokenizer, text encoder, VAE and a noise scheduler whose prediction type matches the training target, so
`StableDiffusionPipeline.from_pretrained(dir)` and the serving stage load it directly. A LoRA run's
(`train.lora.enabled`) holds the adapter only (sdray.models.lora describes the files), which
`StableDiffusionPipeline.from_pretrained(base).load_lora_weights(dir)` and `sdray generate --lora` apply.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdray import storage
from sdray.errors import InputError
from sdray.models import lora as lora_files
from sdray.models.components import load_components, save_components
from sdray.models.config import TRAIN_INFO_FILE
from sdray.train import checkpoint, lora
from sdray.train.checkpoint import RunSpec
from sdray.train.validation import FROZEN_PARTS

log = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint_dir: str | Path, out_uri: str, *, use_ema: bool = True, overwrite: bool = False
) -> str:
    """Write the model of the local checkpoint directory ``checkpoint_dir`` to ``out_uri`` (local or s3://).

    An earlier export in ``out_uri`` is replaced; any other non-empty folder only with ``overwrite``.

    Returns:
        ``out_uri``.
    """
    storage.refuse_to_replace(out_uri, marker=TRAIN_INFO_FILE, what="an sdray export", overwrite=overwrite)
    spec = checkpoint.read_spec(checkpoint_dir)
    state = checkpoint.read_shared_state(checkpoint_dir)
    if spec.train.lora.enabled:
        return export_lora(spec, state, out_uri, use_ema=use_ema, origin=str(checkpoint_dir))
    components = load_components(spec.model, (*FROZEN_PARTS, "unet"))
    unet: UNet2DConditionModel = components.unet
    unet.load_state_dict(state["unet"], assign=True)  # the checkpoint's (memory-mapped) tensors, not a copy
    if use_ema and state["ema"] is not None:
        ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.load_state_dict(state["ema"])
        ema.copy_to(unet.parameters())
    components.scheduler = DDPMScheduler.from_config(
        components.scheduler.config, prediction_type=spec.train.loss.prediction_type
    )
    info = {"step": state["step"], "weights": "ema" if use_ema and state["ema"] is not None else "raw"}
    with storage.staged_dir(out_uri) as staged:
        save_components(components, staged)
        (staged / TRAIN_INFO_FILE).write_text(yaml.safe_dump({**info, **spec.to_dict()}, sort_keys=False))
    log.info("exported step %d (%s weights) to %s", state["step"], info["weights"], out_uri)
    return out_uri


def export_lora(
    spec: RunSpec, state: dict, out_uri: str, *, use_ema: bool = True, origin: str = "checkpoint"
) -> str:
    """Write the LoRA adapter of a checkpoint's shared ``state`` (EMA weights by default) to ``out_uri``.

    The base UNet is rebuilt from the run's model config (on the CPU, fp32) only to carry the adapter.
    """
    unet = load_components(spec.model, ["unet"]).unet
    params = lora.add_adapter(unet, spec.train.lora, seed=0)  # its init is replaced by the checkpoint's
    lora.load_adapter_state_dict(unet, state["unet"], origin=origin)
    ema = use_ema and state["ema"] is not None
    if ema:
        shadow = EMAModel(params)
        shadow.load_state_dict(state["ema"])
        shadow.copy_to(params)
    info = {
        "step": state["step"],
        "weights": "ema" if ema else "raw",
        "base_model": spec.model.source,
        "trainable_parameters": sum(p.numel() for p in params),
        **spec.to_dict(),
    }
    with storage.staged_dir(out_uri) as staged:
        lora.save_lora_dir(unet, staged, kohya=spec.train.lora.kohya)
        (staged / lora_files.INFO_FILE).write_text(yaml.safe_dump(info, sort_keys=False))
    log.info(
        "exported the LoRA adapter of step %d (%s weights) to %s", state["step"], info["weights"], out_uri
    )
    return out_uri


def export_from_uri(
    checkpoint_uri: str, out_uri: str, *, use_ema: bool = True, overwrite: bool = False
) -> str:
    """Export from a checkpoint anywhere Ray Train can read it (a local directory or a storage URI)."""
    from ray.train import Checkpoint

    if not storage.exists(checkpoint_uri):
        raise InputError(f"checkpoint {checkpoint_uri} does not exist{_existing_checkpoints(checkpoint_uri)}")
    storage.refuse_to_replace(out_uri, marker=TRAIN_INFO_FILE, what="an sdray export", overwrite=overwrite)
    with storage.checkpoint_files(Checkpoint(storage.absolute(checkpoint_uri))) as local:
        return export_checkpoint(local, out_uri, use_ema=use_ema, overwrite=overwrite)


def _existing_checkpoints(checkpoint_uri: str) -> str:
    """``"; the run has: a, b"`` listing the checkpoints beside a missing one (only the last few are kept)."""
    import pyarrow.fs as pafs

    parent = checkpoint_uri.rstrip("/").rpartition("/")[0]
    if not parent or not storage.exists(parent):
        return ""
    fs, path = storage.resolve(parent)
    names = sorted(
        e.base_name
        for e in fs.get_file_info(pafs.FileSelector(path))
        if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint")
    )
    if not names:
        return f"; {parent} holds no checkpoints"
    return f"; {parent} has {', '.join(names)} (only the last train.keep_checkpoints are kept)"
