"""TrainConfig: stage 2 settings. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    data: str = ""
    """Latent cache written by `sdray preprocess`."""
    output: str = ""
    """Run directory: checkpoints, metrics, validation images, exported model."""
    num_workers: int = 1
    """Ray Train workers (DDP processes)."""
    use_gpu: bool = False
    """One GPU per worker."""
    batch_size: int = 16
    """Examples per worker per step."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    max_steps: int = 100
    """Optimizer steps to train."""
    seed: int = 0
    """Seed of noise, timesteps, dropout and data order."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be >= 1")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
