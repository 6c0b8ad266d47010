"""VAE stage: train or fine-tune the AutoencoderKL on images (Ray Train) and export it in diffusers format.

`config` (VaeTrainConfig, light), `data` (Ray Data image decoding), `loss` (objective, PSNR), `train`
(TorchTrainer and the per-worker loop), `export` (diffusers directory, full model assembly).
"""
