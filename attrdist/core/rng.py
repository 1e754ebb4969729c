"""Explicit randomness: keys are integers folded from (seed, epoch, sample index, ...).

Nothing in attrdist draws from a global RNG on the data path. A sample's augmentation is a pure
function of (image, key) with `key = fold(seed, epoch, index)`, so the same sample gets the same
augmentation whatever the number of workers or processes, and a resumed run needs no saved RNG
state. `fold` uses numpy's SeedSequence (a well-mixed hash of the integer tuple).
"""

from __future__ import annotations

import numpy as np


def fold(*parts: int) -> int:
    """Mix non-negative integers into one 64-bit key (pure, order-sensitive)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def generator(*parts: int) -> np.random.Generator:
    """A numpy Generator determined by `parts` (e.g. `generator(seed, epoch, index)`)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) for p in parts])))


# Stream tags keep unrelated uses of the same (seed, epoch) apart.
AUGMENT = 1
ORDER = 2
INIT = 3
DROPOUT = 4  # torch's global RNG is re-seeded from (seed, epoch, batch, rank) before every forward
