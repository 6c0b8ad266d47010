"""Stage 2: UNet training on cached latents with Ray Train."""
