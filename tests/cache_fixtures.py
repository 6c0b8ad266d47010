"""Build a small latent cache with the tiny encoders, following the `sdray.data.cache` contract.

Used by the training tests (and usable by anyone who needs a cache without running stage 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sdray.data import cache
from sdray.data.synth import SynthConfig, iter_scenes, render
from sdray.models.components import SDComponents
from sdray.models.fingerprint import encoder_fingerprint

# Metadata of a small tiny-preset cache (4x8x8 latents, 32-wide text embeddings), for tests without Ray.
TINY_INFO = cache.CacheInfo(
    vae_scaling_factor=0.18215,
    encoder_fingerprint="ab" * 32,
    resolution=64,
    latent_shape=(4, 8, 8),
    text_embeds_shape=(77, 32),
    has_std=True,
)


@torch.inference_mode()
def _encode_text(components: SDComponents, captions: list[str]) -> np.ndarray:
    tokens = components.tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return components.text_encoder(tokens.input_ids).last_hidden_state.numpy()  # (N, 77, D)


@torch.inference_mode()
def _encode_images(components: SDComponents, images: list) -> tuple[np.ndarray, np.ndarray]:
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) for im in images])
    posterior = components.vae.encode(pixels / 127.5 - 1.0).latent_dist  # (N, 4, h, w)
    return posterior.mean.numpy(), posterior.std.numpy()


def write_test_cache(
    out_dir: Path,
    components: SDComponents,
    *,
    num_rows: int = 48,
    rows_per_shard: int = 16,
    has_std: bool = True,
    **info_overrides,
) -> Path:
    """Encode ``num_rows`` synthetic 64px scenes and write parquet shards plus sidecars to ``out_dir``."""
    synth = SynthConfig(num_images=max(num_rows, 1), resolution=64)
    scenes = [(render(s, 64, rng), s.caption) for _, s, rng in iter_scenes(synth)][:num_rows]
    info = cache.CacheInfo(
        vae_scaling_factor=components.vae_scaling_factor,
        encoder_fingerprint=encoder_fingerprint(components),
        resolution=64,
        latent_shape=(4, 8, 8),
        text_embeds_shape=(77, components.text_embed_dim),
        has_std=has_std,
        model_source="preset:tiny",
    )
    info = dataclasses.replace(info, **info_overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, max(num_rows, 1), rows_per_shard):
        chunk = scenes[start : start + rows_per_shard]
        if chunk:
            mean, std = _encode_images(components, [im for im, _ in chunk])
            text = _encode_text(components, [c for _, c in chunk])
        else:  # an empty shard: a cache with zero rows
            mean = std = np.zeros((0, 4, 8, 8), np.float32)
            text = np.zeros((0, *info.text_embeds_shape), np.float32)
        table = cache.to_table(
            info,
            ids=[f"row-{start + i}" for i in range(len(chunk))],
            latents=mean,
            latent_std=std if has_std else None,
            text_embeds=text,
            captions=[c for _, c in chunk],
        )
        pq.write_table(table, out_dir / f"part-{start // rows_per_shard:05d}.parquet")
    cache.write_sidecars(out_dir, info, _encode_text(components, [""])[0])
    return out_dir
