"""Counter-based randomness: a value for (seed, epoch, sample index, stream) that does not depend on
batch composition, worker count, device count or how many draws came before.

This is what makes augmentation identical on 1 or N devices and a resumed run equal to an
uninterrupted one: a sample's crop in epoch e is a pure function of (seed, e, index).
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, epoch: int | np.ndarray, index: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per element of `index` (float64, 53-bit resolution)."""
    index = np.asarray(index, dtype=np.uint64)
    z = _splitmix64(np.full_like(index, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
    z = _splitmix64(z ^ np.asarray(epoch, dtype=np.uint64))
    z = _splitmix64(z ^ index)
    z = _splitmix64(z ^ np.uint64(stream))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
