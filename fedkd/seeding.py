"""Every random stream is derived from (seed, ..., tag): never from global state.

`derive_seed(seed, round, partition_id, "train")` gives the same 63-bit integer in
every process, so clients on different Ray workers and the server agree on streams
without talking to each other.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

Key = int | str


def _as_int(key: Key) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode())  # stable across processes, unlike hash()
    if key < 0:
        raise ValueError(f"seed keys must be non-negative, got {key}")
    return int(key)


def derive_seed(*keys: Key) -> int:
    """A 63-bit seed that is a pure function of the keys."""
    seq = np.random.SeedSequence([_as_int(k) for k in keys])
    return int(seq.generate_state(1, dtype=np.uint64)[0]) >> 1


def numpy_rng(*keys: Key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_as_int(k) for k in keys]))


def sample_rows(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` of n row indices, drawn by `rng` and sorted; all of them, in order,
    when count >= n."""
    if count >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=count, replace=False))


def torch_generator(*keys: Key) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*keys))
    return gen
