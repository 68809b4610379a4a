"""Per-client state that persists across rounds, kept on disk rather than in Flower's
Context (which is serialized on every call).

In simulation the store lives in the run directory; on a device it is a local folder.
Writes are atomic: a killed process leaves the previous state, never half a file.

Each state is saved with the round that produced it, and the store keeps the one
before it too: a run resumed from the checkpoint of round r replays round r + 1, and
a client that had already saved its round-(r + 1) state before the kill must start
that round again from the state it had before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedkd.atomic import write_atomic

ROUND = "_round"  # the round a saved state comes from


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, partition_id: int, previous: bool = False) -> Path:
        return self.root / f"client_{partition_id:06d}{'.prev' if previous else ''}.pt"

    def _read(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def load(self, partition_id: int, before_round: int | None = None) -> dict[str, Any] | None:
        """The client's latest state, or, with `before_round`, the latest one saved by
        an earlier round."""
        for previous in (False, True):
            state = self._read(self.path(partition_id, previous))
            if state is None:
                continue
            if before_round is None or state.get(ROUND, 0) < before_round:
                return state
        return None

    def clear(self) -> None:
        """Forget every client's state (a new run starts from scratch)."""
        for path in self.root.glob("client_*.pt"):
            path.unlink()

    def save(self, partition_id: int, state: dict[str, Any], rnd: int = 0) -> None:
        """Save the state `rnd` produced; an older round's state becomes the previous."""
        latest = self.path(partition_id)
        current = self._read(latest)
        if current is not None and current.get(ROUND, 0) < rnd:
            os.replace(latest, self.path(partition_id, previous=True))
        write_atomic(latest, lambda f: torch.save({**state, ROUND: rnd}, f))
