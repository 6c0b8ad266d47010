"""`sdray dreambooth`: instance images + class images from the base model -> caches -> prior-preserving training."""
