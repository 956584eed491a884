"""Deterministic random streams keyed by (seed, purpose, ids).

Every random draw of the simulator comes from a generator derived here, never
from a global RNG, so that a file depends only on the seed and its own ids and
jobs can run in any order or in parallel.
"""

from __future__ import annotations

import zlib

import numpy as np


def _key(part: int | str) -> int:
    if isinstance(part, (int, np.integer)):
        return int(part) & 0xFFFFFFFF
    return zlib.crc32(str(part).encode())


def seed_sequence(seed: int, *keys: int | str) -> np.random.SeedSequence:
    """Seed sequence for ``seed`` and a tuple of ids/purposes (strings hashed stably)."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(_key(k) for k in keys)])


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy generator for ``(seed, *keys)``; the same keys give the same stream."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def int_seed_for(seed: int, *keys: int | str) -> int:
    """A positive 31-bit integer seed (for ``galsim.BaseDeviate``)."""
    return int(seed_sequence(seed, *keys).generate_state(1)[0] & 0x7FFFFFFF) or 1
