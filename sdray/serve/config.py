"""ServeConfig: stage 3 settings. Light: imports no torch or ray."""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless you mean to expose the service."""
    port: int = 8000
    """HTTP port."""
    max_batch_size: int = 8
    """Largest batch of compatible requests per UNet call."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
