"""Mixed precision of the training stages: which autocast dtype a `mixed_precision` setting means on a device.

One rule for the UNet (`train.mixed_precision`) and the VAE (`vae_train.mixed_precision`):

- `auto`: bf16 on a GPU, fp32 on a CPU (at the tiny and demo sizes bf16 made the CPU UNet step slower);
- `no`: fp32 everywhere;
- `bf16`: bf16 autocast on either device. On a CPU with native bf16 (AVX512-BF16 or AMX) oneDNN runs the
  convolutions and matmuls in bf16: the demo's VAE step ran 1.5x faster, the sd15 UNet step at 256 px 1.3x
  (benchmarks/results/cpu_step_speed.md). A CPU without it would emulate bf16, slower than fp32, so there it
  runs fp32 and says so;
- `fp16`: GPU only (it needs a gradient scaler).

Weights, gradients and optimizer state stay fp32; only a LoRA run's frozen UNet weights take the autocast
dtype (sdray/train/state.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]

log = logging.getLogger(__name__)


def autocast_dtype(mode: MixedPrecision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``mode`` on ``device``, or None for plain fp32."""
    import torch  # config modules import this file for MixedPrecision and must stay free of torch

    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16 if device.type == "cuda" else None
    if device.type == "cpu" and not cpu_has_native_bf16():
        _warn_no_native_bf16()
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast(mode: MixedPrecision, device: torch.device):
    """Autocast in the dtype ``mode`` means on ``device``; nothing when that is fp32."""
    import torch

    dtype = autocast_dtype(mode, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


@functools.cache  # autocast asks at every micro-batch; the answer never changes in a process
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN finds AVX512-BF16 or AMX on this CPU."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache  # once per process, not at every step
def _warn_no_native_bf16() -> None:
    log.warning("mixed_precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); training in fp32")
