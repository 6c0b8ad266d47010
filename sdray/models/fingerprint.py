"""A fingerprint of the frozen encoders, stored in every latent cache so mismatched caches are refused."""

from __future__ import annotations

import hashlib
import json

import torch

from sdray.models.components import SDComponents

# Only settings that change the encoders' outputs; file metadata (_name_or_path, versions) must not count.
_VAE_KEYS = (
    "latent_channels",
    "block_out_channels",
    "norm_num_groups",
    "act_fn",
    "scaling_factor",
    "shift_factor",
)
_TEXT_KEYS = ("hidden_act", "layer_norm_eps", "num_attention_heads", "hidden_size", "eos_token_id")


def _hash_module(h: hashlib._Hash, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        # fp32 on CPU: the same weights give the same fingerprint whatever device they were loaded to.
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def encoder_fingerprint(components: SDComponents) -> str:
    """sha256 over the VAE and text encoder (selected config keys + weights) and the tokenizer vocabulary.

    Returns:
        64 hex characters; equal for a preset built twice or saved and reloaded.
    """
    components.require("vae", "text_encoder", "tokenizer")
    h = hashlib.sha256()
    vae_cfg = {k: components.vae.config.get(k) for k in _VAE_KEYS}
    text_cfg = {k: getattr(components.text_encoder.config, k, None) for k in _TEXT_KEYS}
    h.update(json.dumps({"vae": vae_cfg, "text": text_cfg}, sort_keys=True, default=list).encode())
    vocab = components.tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    _hash_module(h, components.vae)
    _hash_module(h, components.text_encoder)
    return h.hexdigest()
