"""LoRA training with peft: adapters on the UNet, the only weights that train; their state and their export.

Follows diffusers' current `train_text_to_image_lora.py` and peft's docs: base weights `requires_grad_(False)`,
`unet.add_adapter(peft.LoraConfig(...))`, the optimizer and EMA over the adapter parameters only; export as
`convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))` through the pipeline's `save_lora_weights`
with the adapter config as metadata (https://huggingface.co/docs/diffusers/training/lora). UNet only: a text
encoder adapter would need the text encoder in the loop, and training reads cached text embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from sdray.errors import ConfigError, InputError
from sdray.models.lora import KOHYA_FILE
from sdray.train.config import LoraConfig

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name; diffusers' save/load helpers expect it
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    """The peft config of ``cfg`` (alpha 0 means alpha = rank)."""
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
    )


def check_targets(unet: torch.nn.Module, targets: Sequence[str]) -> None:
    """Raise ConfigError naming every target that matches no Linear/Conv2d module (peft's suffix rule).

    peft itself fails only when no target matches at all, so one typo among four would silently train less.
    Works on a UNet built on the meta device (no weights needed).
    """
    names = [name for name, module in unet.named_modules() if isinstance(module, _ADAPTABLE)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        known = sorted({_short_name(n) for n in names})
        raise ConfigError(
            f"train.lora.target_modules: {', '.join(repr(t) for t in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no Linear or Conv2d module of the UNet "
            f"(its module names end in: {', '.join(known)})"
        )


def _short_name(name: str) -> str:
    """``...attn1.to_out.0`` -> ``to_out.0``; ``...attn1.to_q`` -> ``to_q``."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def add_adapter(unet: torch.nn.Module, cfg: LoraConfig, *, seed: int) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add a LoRA adapter; returns the adapter parameters (the only ones that train).

    The adapter's random init is drawn from ``seed`` in a forked RNG, so every DDP rank builds the same
    adapter and the global RNG stream is untouched.
    """
    check_targets(unet, cfg.target_modules)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(peft_config(cfg), adapter_name=ADAPTER)
    params = trained_parameters(unet)
    log.info(
        "LoRA rank %d on %s: %d trainable parameters of %d",
        cfg.rank,
        ", ".join(cfg.target_modules),
        sum(p.numel() for p in params),
        sum(p.numel() for p in unet.parameters()),
    )
    return params


def trained_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train: all of a fully fine-tuned UNet, the adapter's of a LoRA one."""
    return [p for p in unet.parameters() if p.requires_grad]


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format (``<module>.lora_A.weight``), nothing of the base model."""
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def load_adapter_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor], *, origin: str) -> None:
    """Set the adapter of ``unet`` from ``adapter_state_dict`` output; a key that does not fit is an error."""
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    except RuntimeError as exc:  # shape mismatch: the run's lora settings changed
        raise InputError(f"{origin}: adapter does not fit the configured train.lora ({exc})") from exc
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise InputError(f"{origin}: adapter has weights the configured train.lora lacks: {unexpected[0]}")


def save_lora_dir(unet: torch.nn.Module, out: Path, *, kohya: bool = False) -> Path:
    """Write ``unet``'s adapter to ``out`` in diffusers' format (and kohya's); returns ``out``.

    `pytorch_lora_weights.safetensors` carries the peft config as metadata, which diffusers'
    `load_lora_weights` reads back (alpha != rank keeps its scale).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_state = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state_dict(unet).items()}
    metadata = unet.peft_config[ADAPTER].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    if kohya:
        _save_kohya(peft_state, float(metadata["lora_alpha"]), out / KOHYA_FILE)
    return out


def _save_kohya(peft_state: dict[str, torch.Tensor], alpha: float, path: Path) -> None:
    """kohya keys via diffusers' converter; its `.alpha` entries say alpha = rank, so set the real alpha."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    state = {k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
