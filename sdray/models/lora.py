"""LoRA adapters at inference: the file layout, `DIR[:SCALE]` specs, and loading into a diffusers pipeline.

A LoRA directory (written by `sdray train` with `train.lora.enabled`, or by diffusers' `save_lora_weights`)
holds `pytorch_lora_weights.safetensors` in diffusers' format: keys `unet.<module>.lora.down.weight` /
`.lora.up.weight`, with the peft adapter config (rank, alpha, target modules) in the safetensors metadata so
that alpha != rank keeps its scale. sdray also writes `sdray_lora.yaml` (how it was trained) and, on request,
`pytorch_lora_weights_kohya.safetensors` (the `lora_unet_*` layout AUTOMATIC1111 and ComfyUI read).

Loading checks every UNet entry of the file against the model before peft touches it: diffusers alone only
warns when an adapter's modules are missing or silently loads part of it, and a shape mismatch surfaces as a
long state_dict traceback.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdray.errors import InputError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' LoRA weights file name (what `load_lora_weights(dir)` looks for)."""
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
"""The same adapter with kohya keys (`lora_unet_..._to_q.lora_down.weight`, `.alpha`)."""
INFO_FILE = "sdray_lora.yaml"
"""sdray's record of the run that trained the adapter (step, weights, base model, train config)."""


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to apply: a LoRA directory (local or URI) and the scale of its update (1 = as trained)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``DIR`` or ``DIR:SCALE`` (a URI's ``s3://`` colon is not a scale: the tail must be a number)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and "/" not in tail:
            try:
                return cls(path=head, scale=float(tail))
            except ValueError:
                pass
        return cls(path=text)

    def absolute(self) -> LoraSpec:
        """The same adapter with a local path made absolute: Ray workers may run in another directory."""
        from sdray.storage import absolute

        return dataclasses.replace(self, path=absolute(self.path))

    def __str__(self) -> str:
        return self.path if self.scale == 1.0 else f"{self.path}:{self.scale!r}"


def weights_file(path: str) -> Path:
    """The local weights file of LoRA directory ``path`` (downloaded once if it is a URI)."""
    from sdray.storage import local_copy

    local = Path(local_copy(path))
    if not local.is_dir():
        raise InputError(f"LoRA {path}: no such directory")
    file = local / WEIGHTS_FILE
    if not file.is_file():
        found = ", ".join(sorted(p.name for p in local.iterdir())) or "nothing"
        raise InputError(f"LoRA {path}: no {WEIGHTS_FILE} (found: {found})")
    return file


def check_fits(unet: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> int:
    """Raise InputError unless every UNet LoRA matrix of ``state_dict`` lands on a module of matching shape.

    Args:
        unet: the model's UNet2DConditionModel.
        state_dict: diffusers' `lora_state_dict` output (keys `unet.<module>.lora...`, any other prefix skipped).
        name: the file, for messages.
    Returns:
        The number of UNet modules the adapter changes.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet_keys = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    peft_keys = convert_unet_state_dict_to_peft(unet_keys)  # <module>.lora_A.weight / .lora_B.weight
    modules = dict(unet.named_modules())
    touched = set()
    for key, matrix in peft_keys.items():
        module_name, sep, part = key.partition(".lora_")
        if not sep or not part.startswith(("A.", "B.")):
            continue
        base = getattr(modules.get(module_name), "weight", None)
        if base is None:
            raise InputError(
                f"{name}: the adapter changes {module_name!r}, which this model's UNet does not have "
                "(an adapter for another architecture?)"
            )
        fits = matrix.shape[1] == base.shape[1] if part[0] == "A" else matrix.shape[0] == base.shape[0]
        if not fits:
            raise InputError(
                f"{name}: the adapter does not fit this model: {module_name} has weight "
                f"{tuple(base.shape)}, the adapter's lora_{part[0]} is {tuple(matrix.shape)} "
                "(an adapter trained on another base model?)"
            )
        touched.add(module_name)
    if not touched:
        raise InputError(f"{name}: no UNet LoRA weights in the file")
    return len(touched)


def load_loras(pipe: StableDiffusionPipeline, specs: list[LoraSpec]) -> list[str]:
    """Load every adapter of ``specs`` into ``pipe`` (peft layers, unfused) and activate them at their scales.

    Adapters are named ``lora0``, ``lora1``, ... in order; returns the names. Weights are read from
    safetensors only and never fetched from a hub.
    """
    names = []
    for i, spec in enumerate(specs):
        file = weights_file(spec.path)
        state, _ = pipe.lora_state_dict(str(file.parent), **_local_safetensors())
        check_fits(pipe.unet, state, str(Path(spec.path) / WEIGHTS_FILE))
        name = f"lora{i}"
        pipe.load_lora_weights(str(file.parent), adapter_name=name, **_local_safetensors())
        names.append(name)
        log.info("LoRA %s loaded as %s (scale %g)", spec.path, name, spec.scale)
    if names:
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    return names


def _local_safetensors() -> dict[str, object]:
    return {"weight_name": WEIGHTS_FILE, "use_safetensors": True, "local_files_only": True}
