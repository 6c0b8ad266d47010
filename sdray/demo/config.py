"""DemoOptions: how `sdray demo` runs. Light: imports no torch or ray.

The stages' own sizes (data, VAE, UNet, steps) come from the pipeline config (`pipelines/configs/demo.yaml`);
these options say where the demo writes and how it samples and scores the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdray.errors import ConfigError

# `--quick`: the same stages on a few hundred images with a few dozen steps (a smoke run of 1-2 minutes on an
# idle 2-core CPU; used by tests/test_demo.py). Applied on top of the config like `--set` flags.
QUICK_OVERRIDES: tuple[str, ...] = (
    "synth.num_images=256",
    "synth.rows_per_shard=128",
    "vae_train.num_workers=1",  # one worker process per training stage: process start-up dominates here
    "vae_train.max_steps=10",
    "vae_train.report_every=10",
    "vae_train.target_psnr=0",
    "vae_train.batch_size=8",
    "vae_train.lr_warmup_steps=2",
    "vae_train.holdout_fraction=0.05",
    "vae_train.max_eval_images=16",
    "vae_train.scaling_images=64",
    "preprocess.rows_per_shard=128",
    "train.num_workers=1",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.batch_size=8",
    "train.checkpoint_every=10",
)

QUICK_IMAGES = 24
"""Images generated in quick mode: the 8 held-out combinations and the first 16 seen ones."""


@dataclass(kw_only=True, frozen=True)
class DemoOptions:
    output: str = "runs/demo"
    """Run directory: data/, vae/, model/, cache/, train/, samples/ and report/ (the report)."""
    quick: bool = False
    """Smoke run: QUICK_OVERRIDES on top of the config; 1 sample per prompt, 4 steps, QUICK_IMAGES images."""
    overwrite: bool = False
    """Delete an existing run directory first; without it an existing non-empty directory is refused."""
    samples_per_prompt: int = 2
    """Generated images per (colour, shape, position) combination (seeds differ); quick mode uses 1."""
    sampler_steps: int = 25
    """DDIM steps per generated image; quick mode uses 4."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale of the generated images."""
    scheduler: str = "ddim"
    """Sampler scheduler name (see `sdray generate --help`)."""
    seed: int = 0
    """Seed of the first generated image; image i uses seed + i (fixed, so reruns draw the same noise)."""
    num_real: int = 256
    """Real synth images scored as the upper bound of the metric."""
    grid_images: int = 48
    """Generated images shown in the sample grid (held-out combinations first)."""
    max_batch: int = 16
    """Images per sampler batch."""
    max_images: int = 0
    """Generate only the first this many prompts (held-out combinations come first); 0 = all of them."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("demo output directory is empty (--out)")
        if self.max_images < 0:
            raise ConfigError(f"demo max_images must be >= 0, got {self.max_images}")
        for name in ("samples_per_prompt", "sampler_steps", "num_real", "grid_images", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"demo guidance_scale must be >= 1, got {self.guidance_scale}")

    def effective(self) -> DemoOptions:
        """The options actually used: quick mode caps the sample count and sampler steps."""
        if not self.quick:
            return self
        from dataclasses import replace

        return replace(
            self,
            samples_per_prompt=1,
            sampler_steps=min(self.sampler_steps, 4),
            num_real=min(self.num_real, 128),
            max_images=min(self.max_images or QUICK_IMAGES, QUICK_IMAGES),
        )
