"""Architectures of the `tiny` and `sd15` presets, as constructor kwargs of the real classes.

sd15 numbers are the public configs of Stable Diffusion 1.5 (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M).
`tiny` keeps SD's data flow (77 tokens, cross-attention, 8x VAE downsampling, 4 latent channels) at a size
a test builds in a fraction of a second.
"""

from __future__ import annotations

from typing import Any

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# The real ids; transformers' CLIPTextConfig defaults (bos 0, eos 2) are legacy values.
CLIP_SPECIAL_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

SD15: dict[str, dict[str, Any]] = {
    "text_encoder": dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=768,
        **CLIP_SPECIAL_IDS,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    "unet": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "scheduler": dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ),
}

TINY: dict[str, dict[str, Any]] = {
    "text_encoder": dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=32,
        **CLIP_SPECIAL_IDS,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ),
    "unet": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "scheduler": SD15["scheduler"],
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"tiny": TINY, "sd15": SD15}
