"""Seeds of the training run's random streams, derived so that no two streams can share a seed.

Every stream (the torch global RNG, each worker's noise generator, each epoch's shuffle, a re-seed after a
resume with more workers) takes its seed from ``numpy.random.SeedSequence([seed, purpose, rank, len(more), *more])``:
distinct (seed, purpose, rank, epoch/step) tuples give statistically independent seeds, where sums such as
``seed * 1000 + rank`` collide (rank 17's global seed was rank 0's generator seed).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a seed is for; part of the SeedSequence entropy, so streams never coincide."""

    GLOBAL = 0
    """torch's global RNG (dropout, if the UNet has any)."""
    GENERATOR = 1
    """The worker's noise generator: posterior samples, caption dropout, noise, timesteps."""
    SHUFFLE = 2
    """The local shuffle buffer of one epoch."""
    RESEED = 3
    """The generator of a rank that has no saved RNG state (resumed with more workers), per step."""
    LORA_INIT = 4
    """The LoRA adapter's initial weights (drawn with rank 0's seed on every rank: one adapter for all)."""


def stream_seed(seed: int, stream: Stream, rank: int, *more: int) -> int:
    """A 32-bit seed for ``stream`` of worker ``rank`` (``more``: epoch or step) of the run seeded ``seed``.

    32 bits fit every consumer (torch generators, numpy, Ray Data's ``local_shuffle_seed``).
    """
    # len(more) is part of the entropy: SeedSequence pads with zeros, so (..., rank) would equal (..., rank, 0).
    entropy = [seed, int(stream), rank, len(more), *more]
    if min(entropy) < 0:
        raise ValueError(f"seed parts must be >= 0, got {entropy}")
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])
