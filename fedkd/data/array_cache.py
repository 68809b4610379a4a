"""Arrays derived from data files (decoded IDX files, decoded Hugging Face images),
kept as .npy files in fedkd's cache so the other processes of a run, and later runs,
skip decoding them again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedkd.atomic import write_atomic


def cached_array(
    path: Path,
    build: Callable[[], np.ndarray],
    fits: Callable[[np.ndarray], bool] = lambda _: True,
) -> np.ndarray:
    """`build()`'s array, kept at `path` (.npy) so later processes skip building it.

    An entry that cannot be read or does not `fit` is built again and replaced; a
    read-only cache only costs the speed-up. Never unpickles."""
    if path.exists():
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            array = None  # a damaged entry is rebuilt
        if array is not None and fits(array):
            return array
    array = build()
    with contextlib.suppress(OSError):
        write_atomic(path, lambda f: np.save(f, array))
    return array
