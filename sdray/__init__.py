"""sdray: Stable Diffusion as a distributed data-and-training pipeline on Ray.

Stages: ``sdray.preprocess`` (Ray Data: images -> cached latents), ``sdray.train`` (Ray Train: UNet on the
cache), ``sdray.serve`` (Ray Serve: text-to-image HTTP). ``sdray.models`` builds the diffusers/transformers
components without downloads; ``sdray.config`` turns YAML into typed, validated dataclasses.
"""

import os

# transformers warns at import that torchvision (which we do not install) is missing; only errors matter.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
