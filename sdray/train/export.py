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

import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdray import storage
from sdray.errors import InputError
from sdray.models import lora as lora_files
from sdray.models.components import load_components, save_components
from sdray.models.config import TRAIN_INFO_FILE, ModelConfig, architecture
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
    checkpoint.refuse_to_replace_export(out_uri, overwrite=overwrite)
    spec = checkpoint.read_spec(checkpoint_dir)
    state = checkpoint.read_shared_state(checkpoint_dir)
    if spec.train.lora.enabled:
        # The base UNet is rebuilt from the run's model config (on the CPU, fp32) only to carry the adapter.
        unet = load_components(spec.model, ["unet"]).unet
        params = lora.add_adapter(unet, spec.train.lora, seed=0)  # its init is replaced by the checkpoint's
        lora.load_adapter_state_dict(unet, state["unet"], origin=str(checkpoint_dir))
    else:
        unet = trained_unet(spec.model, state["unet"])
        params = list(unet.parameters())
    ema = None
    if use_ema and state["ema"] is not None:
        ema = EMAModel(params)
        ema.load_state_dict(state["ema"])
    return write_export(spec, unet, params, ema, state["step"], out_uri)


def write_export(
    spec: RunSpec,
    unet: UNet2DConditionModel,
    params: list[torch.nn.Parameter],
    ema: EMAModel | None,
    step: int,
    out_uri: str,
) -> str:
    """Write the model of a run at ``step`` to ``out_uri``: its diffusers model directory, or with `train.lora`
    its adapter's directory; ``ema``'s weights are copied into ``params`` (``unet``'s trained parameters)
    first, so a training worker calls this only when it is done with ``unet``.

    Returns:
        ``out_uri``.
    """
    if ema is not None:
        ema.copy_to(params)
    info = {"step": step, "weights": "raw" if ema is None else "ema"}
    with storage.staged_dir(out_uri) as staged:
        if spec.train.lora.enabled:
            lora.save_lora_dir(unet, staged, kohya=spec.train.lora.kohya)
            info |= {"base_model": spec.model.source, "trainable_parameters": sum(p.numel() for p in params)}
            (staged / lora_files.INFO_FILE).write_text(
                yaml.safe_dump({**info, **spec.to_dict()}, sort_keys=False)
            )
        else:
            components = load_components(spec.model, FROZEN_PARTS)
            components.unet = unet
            components.scheduler = DDPMScheduler.from_config(
                components.scheduler.config, prediction_type=spec.train.loss.prediction_type
            )
            save_components(components, staged)
            (staged / TRAIN_INFO_FILE).write_text(yaml.safe_dump({**info, **spec.to_dict()}, sort_keys=False))
    what = "the LoRA adapter" if spec.train.lora.enabled else "the model"
    log.info("exported %s of step %d (%s weights) to %s", what, step, info["weights"], out_uri)
    return out_uri


def trained_unet(model: ModelConfig, weights: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """The UNet of ``model``'s architecture holding ``weights`` (a checkpoint's memory-mapped tensors, not
    copies); built on the meta device, so the base model's own weights are never read or initialised."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(architecture(model, "unet"))
    unet.load_state_dict(weights, assign=True)  # strict: every parameter and buffer comes from the checkpoint
    return unet.eval()


def export_from_uri(
    checkpoint_uri: str, out_uri: str, *, use_ema: bool = True, overwrite: bool = False
) -> str:
    """Export from a checkpoint anywhere Ray Train can read it (a local directory or a storage URI)."""
    from ray.train import Checkpoint

    if not storage.exists(checkpoint_uri):
        raise InputError(f"checkpoint {checkpoint_uri} does not exist{_existing_checkpoints(checkpoint_uri)}")
    checkpoint.refuse_to_replace_export(out_uri, overwrite=overwrite)
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
