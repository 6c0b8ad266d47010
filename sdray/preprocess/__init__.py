"""Stage 1: image-caption parquet -> cached VAE latents and CLIP text embeddings (Ray Data)."""
