"""Per-client state that persists across rounds, kept on disk rather than in Flower's
Context (which is serialized on every call).

In simulation the store lives in the run directory (or in a per-run folder of a
shared `simulation.client_state_dir`); on a device it is a local folder. Writes are
atomic: a killed process leaves the previous state, never half a file.

Each state is saved with the round that produced it, and the store keeps the one
before it too: a run resumed from the checkpoint of round r replays round r + 1, and
a client that had already saved its round-(r + 1) state before the kill must start
that round again from the state it had before. The same two files make the store
robust: a straggler's older state never replaces a newer one, and an unreadable
state falls back to the previous one.

A marker file names the run that owns the store; only that run deletes files here,
and only the files a store writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedkd.atomic import open_lock, write_atomic
from fedkd.errors import FedKDError

try:
    import fcntl
except ImportError:  # not POSIX: saves of one partition are not serialized
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fedkd")

ROUND = "_round"  # the round a saved state comes from
MARKER = ".fedkd-run"  # the id of the run that owns the store
# every file a store writes: states, their temporary files (fedkd.atomic), locks, and
# a simulated client's DP ledger (fedkd/node_ledger.py) with its lock
OWN_FILE = re.compile(
    r"\.?client_\d{6}(\.prev)?\.pt(-.*)?|\.client_\d{6}\.lock|dp_ledger_\d{6}\.jsonl(\.lock)?"
)


class StoreError(FedKDError):
    """A client state folder that belongs to another run."""


class ClientStore:
    def __init__(self, root: str | Path, run_id: str | None = None, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable  # fsync each save (devices); whole files either way
        self.run_id = run_id  # None: whichever run owns the folder (a client's view)
        self.corrupt = 0  # unreadable state files met (each fell back to the previous)
        self.dropped = 0  # saves of an older round than the one stored (stragglers)
        self._warned: set[tuple[str, int, int]] = set()
        # path -> (file signature, round) of the states this store read or wrote
        self._rounds: dict[Path, tuple[tuple[int, int, int], int]] = {}

    def path(self, partition_id: int, previous: bool = False) -> Path:
        return self.root / f"client_{partition_id:06d}{'.prev' if previous else ''}.pt"

    # ------------------------------------------------------------- reading
    def _read(self, path: Path) -> dict[str, Any] | None:
        """The state in `path`; None if there is none or it cannot be read."""
        try:
            signature = _signature(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # torn, tampered or foreign: any load error
            self._unreadable(path, str(exc).splitlines()[0][:160] if str(exc) else repr(exc))
            return None
        if not isinstance(state, dict):
            self._unreadable(path, f"holds a {type(state).__name__}, not a state")
            return None
        self._rounds[path] = (signature, _round(state))
        return state

    def _stored_round(self, path: Path) -> int | None:
        """The round of the readable state in `path` (None: none), without reading it
        again when this store read that very file last (a save follows a load)."""
        try:
            known = self._rounds.get(path)
            if known is not None and known[0] == _signature(path):
                return known[1]
        except FileNotFoundError:
            return None
        state = self._read(path)
        return None if state is None else _round(state)

    def _unreadable(self, path: Path, why: str) -> None:
        """Count it; warn once per file version, not on every later round."""
        try:
            st = path.stat()
            ident = (str(path), st.st_mtime_ns, st.st_size)
        except OSError:
            ident = (str(path), 0, 0)
        if ident in self._warned:
            return
        self._warned.add(ident)
        self.corrupt += 1
        log.warning("client state %s is unreadable (%s); using the previous state", path, why)

    def load(self, partition_id: int, before_round: int | None = None) -> dict[str, Any] | None:
        """The client's latest state, or, with `before_round`, the latest one saved by
        an earlier round. An unreadable latest state falls back to the previous one."""
        for previous in (False, True):
            state = self._read(self.path(partition_id, previous))
            if state is None:
                continue
            if before_round is None or _round(state) < before_round:
                return state
        return None

    # ------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self, partition_id: int) -> Iterator[None]:
        """One save of a partition at a time: a straggler and the next round's client
        may finish together in two processes. The lock file is never opened through
        a link (fedkd/atomic.py): a planted one is an error, not a file touched."""
        if fcntl is None:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open_lock(self.root / f".client_{partition_id:06d}.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self, partition_id: int, state: dict[str, Any], rnd: int = 0) -> None:
        """Save the state `rnd` produced; an older round's state becomes the previous.
        A state from an older round than the stored one (a straggler) is dropped."""
        latest = self.path(partition_id)
        with self._locked(partition_id):
            stored = self._stored_round(latest)  # None if missing or unreadable
            if stored is not None:
                if stored > rnd:
                    self.dropped += 1
                    log.warning(
                        "client %d: dropped its round-%d state (round %d's is already saved)",
                        partition_id,
                        rnd,
                        stored,
                    )
                    return
                if stored < rnd:
                    os.replace(latest, self.path(partition_id, previous=True))
            write_atomic(latest, lambda f: torch.save({**state, ROUND: rnd}, f), self.durable)
            self._rounds[latest] = (_signature(latest), rnd)

    # ------------------------------------------------------------- ownership
    def owner(self) -> str | None:
        """The id of the run that owns the store (None: no marker)."""
        try:
            return (self.root / MARKER).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def own_files(self) -> list[Path]:
        """The files in the folder a store writes (a marker-less folder's too)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if OWN_FILE.fullmatch(p.name))

    def _check_owner(self) -> None:
        owner, files = self.owner(), self.own_files()
        if owner is None and files:
            raise StoreError(
                f"{self.root}: holds client states that no run claims; "
                "remove them or choose another simulation.client_state_dir"
            )
        if owner is not None and self.run_id is not None and owner != self.run_id:
            raise StoreError(
                f"{self.root}: holds the client states of another run ({owner}); "
                "choose another simulation.client_state_dir"
            )

    def clear(self) -> None:
        """Forget every client's state (a new run starts from scratch) and, with a
        run id, claim the store. Only the owning run's own files are deleted."""
        self._check_owner()
        for path in self.own_files():
            path.unlink(missing_ok=True)
        if self.run_id is not None:
            run_id = self.run_id
            write_atomic(self.root / MARKER, lambda f: f.write(run_id.encode()))

    def remove(self) -> None:
        """Delete this run's files and, if that empties it, the folder (the end of a
        run with keep_client_state=false). A store another run owns is left alone."""
        owner, files = self.owner(), self.own_files()
        if owner is None and not files:
            with contextlib.suppress(OSError):
                self.root.rmdir()
            return
        if owner is None or (self.run_id is not None and owner != self.run_id):
            log.warning("%s: not this run's client states (owner %s); kept", self.root, owner)
            return
        for path in [*files, self.root / MARKER]:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only if empty: files of others stay, and so does the folder


def _signature(path: Path) -> tuple[int, int, int]:
    """Which version of a file this is: an atomic save makes a new inode."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _round(state: dict[str, Any]) -> int:
    value = state.get(ROUND, 0)
    return value if isinstance(value, int) else 0
