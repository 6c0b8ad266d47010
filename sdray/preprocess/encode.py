"""The encoder stage: a callable class that loads the VAE and the text encoder once per Ray actor.

fp16 on a GPU, fp32 on the CPU. The stored latent is the UNSCALED posterior mean (and std when asked);
training multiplies by CacheInfo.vae_scaling_factor once. Rows whose outputs are not finite (fp16
overflow, broken weights) are marked rejected here instead of poisoning the cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from sdray.allocator import Allocator, check_loaded
from sdray.cluster import actor_threads
from sdray.config import from_dict
from sdray.data.cache import CacheInfo
from sdray.data.images import normalise
from sdray.data.rejects import NONFINITE_OUTPUT
from sdray.models.config import ModelConfig
from sdray.preprocess.bucketing import encode_by_bucket, stage_shapes

log = logging.getLogger(__name__)


class Encoder:
    """``map_batches`` class: adds latent / latent_std / text_embeds, drops pixels and input_ids."""

    def __init__(
        self,
        *,
        model: dict[str, Any],
        info_json: str,
        num_threads: int = 0,
        actors: int = 1,
        allocator: Allocator | None = None,
    ) -> None:
        """``num_threads``: torch threads on CPU; 0 shares this machine's cores among the pool's ``actors``
        actors expected on it (sdray.cluster.actor_threads).
        ``allocator``: the one this actor was started with (warns if it did not load); None: not checked."""
        if allocator:
            check_loaded(allocator, "encoder actor", report=True)
        # here, not at the top: the drivers that build pipelines with this class need not import diffusers
        from sdray.models.components import load_components

        self.info = CacheInfo.from_json(info_json, where="cache info")
        model_cfg = from_dict(ModelConfig, model, where="model")
        components = load_components(model_cfg, parts=("text_encoder", "vae"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS to the reserved CPUs: often 1
            torch.set_num_threads(actor_threads(num_threads, actors))
        # Loaded in fp32; cast only when needed (diffusers warns on every AutoencoderKL.to(dtype)).
        self.vae, self.text_encoder = (
            m.to(self.device) if self.dtype == torch.float32 else m.to(self.device, self.dtype)
            for m in (components.vae, components.text_encoder)
        )
        log.info("encoder actor: %s on %s (%s)", model_cfg.source, self.device, self.dtype)

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Encode good rows. ``pixels``: uint8 (B, 3, R, R); ``input_ids``: int64 (B, 77).

        Returns:
            latent (B, C, h, w) [and latent_std] and text_embeds (B, 77, D), float32 numpy.
        """
        x = normalise(torch.from_numpy(pixels).to(self.device, torch.float32)).to(self.dtype)  # (B, 3, R, R)
        posterior = self.vae.encode(x).latent_dist
        ids = torch.from_numpy(input_ids).to(self.device)
        text = self.text_encoder(ids).last_hidden_state  # (B, 77, D)
        out = {"latent": posterior.mean, "text_embeds": text}
        if self.info.has_std:
            out["latent_std"] = posterior.std
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        good = np.flatnonzero(batch["reason"] == "")
        encoded = self._encode_good(batch, good) if len(good) else {}
        # object dtype: Ray may hand strings over as fixed-width "<U1", which would truncate a new reason.
        reasons, details = batch["reason"].astype(object), batch["detail"].astype(object)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "input_ids")}
        for name, values in encoded.items():
            full = np.zeros((n, *values.shape[1:]), np.float16)
            # fp16 is the storage dtype: a value finite in fp32 can still overflow there, so check after casting.
            full[good] = values.astype(np.float16)
            bad = ~np.isfinite(full[good].reshape(len(good), -1)).all(axis=1)
            for i in good[bad]:
                if not reasons[i]:
                    reasons[i], details[i] = NONFINITE_OUTPUT, f"{name} has NaN/inf"
            out[name] = full
        if not encoded:  # a batch of only rejected rows still needs the tensor columns
            out.update(self._zeros(n))
        out["reason"], out["detail"] = reasons, details
        out["encode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out

    def _encode_good(self, batch: dict[str, np.ndarray], good: np.ndarray) -> dict[str, np.ndarray]:
        if self.info.buckets:  # one encoder call per bucket: each call needs one image shape
            return encode_by_bucket(self.encode, batch, good, self.info)
        return self.encode(batch["pixels"][good], batch["input_ids"][good])

    def _zeros(self, n: int) -> dict[str, np.ndarray]:
        shapes = stage_shapes(self.info)
        return {name: np.zeros((n, *shape), np.float16) for name, shape in shapes.items()}
