"""Whole files or nothing: every file fedkd writes that a kill must not tear.

The data is fsynced before the rename and the directory after it: without the first,
a crash of the machine (not only of the process) can leave the new name pointing at
an empty or partial file; without the second, the rename itself can be lost.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort (some platforms and file systems refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(
    path: str | Path, write: Callable[[IO[bytes]], object], durable: bool = True
) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, rename it into place.
    `durable=False` skips the fsyncs: still whole files after a killed process (the
    rename is atomic), but not after a crash of the machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
