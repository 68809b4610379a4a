"""A device's round ledger: every round it accepted, in every run, and the DP-SGD
steps each one released, in an append-only file that outlives runs (deployment).

Why: a device's privacy budget is its own. Each run's accountant starts afresh, so
a server that replays a round, or simply starts another run, would otherwise spend
the device's privacy again unseen. The node writes one line per accepted round
*before* it trains (`admit`), so a retried, replayed or crashed round is counted too,
and refuses a round that would not go forward within its run or would take its
epsilon, over everything it ever released, beyond the owner's `max-epsilon`.

    <state-dir>/ledger-<partition>.jsonl
        {"run": 7, "round": 3, "q": 0.0034, "sigma": 1.0, "steps": 294}

One file per partition: two SuperNodes on one machine (and one state-dir) each
keep their own budget.

Lines are appended with O_APPEND | O_NOFOLLOW under an exclusive lock and fsynced;
an unreadable ledger refuses every round (fail closed), it is never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedkd.node_config import RunRefused
from fedkd.privacy.accounting import composed_epsilon

try:
    import fcntl
except ImportError:  # not POSIX: appends are still atomic lines, not serialized checks
    fcntl = None  # type: ignore[assignment]


def ledger_file(partition_id: int) -> str:
    return f"ledger-{partition_id}.jsonl"


@dataclass(frozen=True)
class Entry:
    """One accepted round: its run, its number, and its DP-SGD release (q, sigma,
    steps; steps 0 without DP-SGD)."""

    run: int
    round: int
    q: float = 0.0
    sigma: float = 0.0
    steps: int = 0

    @classmethod
    def parse(cls, line: str) -> Entry:
        raw = json.loads(line)
        entry = cls(**raw)
        ints = (entry.run, entry.round, entry.steps)
        if any(type(v) is not int for v in ints) or min(ints) < 0:
            raise ValueError("run, round and steps must be integers >= 0")
        if not all(isinstance(v, int | float) and v >= 0 for v in (entry.q, entry.sigma)):
            raise ValueError("q and sigma must be numbers >= 0")
        return entry


def simulation_ledger_file(partition_id: int) -> str:
    """A simulated client's ledger in the run's client store (fedkd/client_store.py
    clears it with the store when a new run starts; a resumed run keeps it)."""
    return f"dp_ledger_{partition_id:06d}.jsonl"


class NodeLedger:
    def __init__(
        self, state_dir: str | Path, partition_id: int = 0, name: str | None = None
    ) -> None:
        self.path = Path(state_dir).expanduser() / (name or ledger_file(partition_id))

    def entries(self) -> list[Entry]:
        """Every line so far; RunRefused if any cannot be read."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._unreadable(f"cannot open it ({exc.strerror})") from None
        with os.fdopen(fd) as f:
            lines = f.read().splitlines()
        out = []
        for number, line in enumerate(lines, 1):
            try:
                out.append(Entry.parse(line))
            except (ValueError, TypeError) as exc:
                raise self._unreadable(f"line {number}: {exc}") from None
        return out

    def _unreadable(self, why: str) -> RunRefused:
        return RunRefused(
            "this node refuses every round: its privacy ledger is unreadable",
            f"{self.path}: {why}",
        )

    def epsilon(self, delta: float, extra: Entry | None = None) -> float:
        """The device's epsilon at `delta` over every DP-SGD step it released (and
        `extra`'s, for a round not yet admitted)."""
        events = [(e.q, e.sigma, e.steps) for e in self.entries() if e.steps > 0]
        if extra is not None and extra.steps > 0:
            events.append((extra.q, extra.sigma, extra.steps))
        return composed_epsilon(events, delta)

    def admit(self, entry: Entry, max_epsilon: float | None, delta: float) -> None:
        """Append `entry` if its round goes forward within its run and its steps keep
        the device within `max_epsilon` (at `delta`); RunRefused, in one line, if not."""
        with self._locked():
            past = [e.round for e in self.entries() if e.run == entry.run]
            if past and entry.round <= max(past):
                raise RunRefused(
                    f"this node refuses round {entry.round}: this run's rounds must go "
                    f"forward (round {max(past)} was already taken)"
                )
            if max_epsilon is not None and entry.steps > 0:
                eps = self.epsilon(delta, entry)
                if not eps <= max_epsilon:
                    raise RunRefused(
                        f"this node refuses round {entry.round}: its DP-SGD steps would take "
                        "the device's epsilon beyond its max-epsilon",
                        f"epsilon would reach {eps:.4g} at delta {delta:g}, "
                        f"over max-epsilon={max_epsilon:g}",
                    )
            self._append(entry)

    def record(self, entry: Entry) -> None:
        """Append `entry` whatever came before: a simulated client counts a retried
        or replayed round again rather than refusing it (its server is the simulator)."""
        with self._locked():
            self._append(entry)

    def _append(self, entry: Entry) -> None:
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One check-and-append at a time (a SuperNode may run ClientApps side by side)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(self.path.with_name(self.path.name + ".lock"), flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
