"""DreamBoothConfig: the inputs of `sdray dreambooth`. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class DreamBoothConfig:
    instance_data: str = ""
    """The subject's images: a folder of image files, or parquet with an `image` column (captions ignored)."""
    instance_prompt: str = ""
    """The caption of every instance image, naming the subject with a rare token, e.g. `a photo of sks dog`."""
    class_prompt: str = ""
    """The subject's class without the token, e.g. `a photo of a dog`: the base model's class images use it."""
    num_class_images: int = 200
    """Class images generated from the base model (with `batch_generate` settings) for prior preservation."""
    prior_preservation: bool = True
    """Pair every instance batch with class images (loss: instance MSE + train.prior_loss_weight x class MSE)."""
    output: str = ""
    """Work directory: instance/, class_prompts.jsonl, class_images/, the two caches and run/ (train.output
    when that is empty). Rerunning the same command resumes every step."""

    def __post_init__(self) -> None:
        if self.num_class_images < 0:
            raise ConfigError(f"num_class_images must be >= 0, got {self.num_class_images}")

    def check(self) -> None:
        """Refuse a run that cannot work, before any work is done (the defaults are empty on purpose)."""
        for name in ("instance_data", "instance_prompt", "output"):
            if not getattr(self, name).strip():
                raise ConfigError(f"dreambooth.{name} is required")
        if self.prior_preservation and (self.num_class_images < 1 or not self.class_prompt.strip()):
            raise ConfigError(
                "prior preservation with no class images: set dreambooth.class_prompt and "
                f"dreambooth.num_class_images >= 1 (got {self.num_class_images}), "
                "or dreambooth.prior_preservation=false"
            )
