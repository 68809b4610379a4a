"""Whole files or nothing: every file fedkd writes that a kill must not tear.

The data is fsynced before the rename and the directory after it: without the first,
a crash of the machine (not only of the process) can leave the new name pointing at
an empty or partial file; without the second, the rename itself can be lost.

Run folders can be shared, so no write here follows a symbolic link planted at its
path: a whole file is a new temporary file (O_EXCL and O_NOFOLLOW) renamed over the
path, which replaces a link rather than writing through it, and an append or a lock
file is opened with O_NOFOLLOW, so a link there is one clear error (`SymlinkError`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fedkd.errors import FedKDError


class SymlinkError(FedKDError):
    """A symbolic link where fedkd appends to or locks a file of its own."""


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
    rename is atomic), but not after a crash of the machine. mkstemp creates the
    temporary file with O_CREAT | O_EXCL | O_NOFOLLOW, and the rename replaces a link
    at `path` instead of following it."""
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """A whole text file (UTF-8) written atomically; a link at `path` is replaced."""
    write_atomic(path, lambda f: f.write(text.encode()))


def open_nofollow(path: str | Path, flags: int, mode: int) -> int:
    """os.open with O_NOFOLLOW: a symbolic link at `path` raises SymlinkError naming
    it, instead of redirecting the write to the file it points at."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if os.path.islink(path):
            raise SymlinkError(
                f"{path} is a symbolic link; fedkd does not write through it"
            ) from exc
        raise


def open_append(path: str | Path, mode: int = 0o644) -> IO[str]:
    """`path` opened to append text (created if missing), never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    return os.fdopen(fd, "a")


def open_lock(path: str | Path, mode: int = 0o600) -> IO[bytes]:
    """A lock file to flock (created if missing), never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    return os.fdopen(fd, "ab")


def make_dir(path: str | Path) -> Path:
    """A folder of fedkd's own inside a run folder, created if missing; a link there
    is a SymlinkError, since every file written into it would land elsewhere."""
    path = Path(path)
    if path.is_symlink():
        raise SymlinkError(f"{path} is a symbolic link; fedkd does not write through it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_new(path: str | Path, data: bytes) -> None:
    """Write a file that must not exist yet (keys, certificates, bundles): an existing
    one is never overwritten, one FedKDError says so."""
    path = Path(path)
    if path.exists():
        raise FedKDError(f"{path} exists; remove it or pick another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))
