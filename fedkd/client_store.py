"""Per-client state that persists across rounds, kept on disk rather than in Flower's
Context (which is serialized on every call).

In simulation the store lives in the run directory; on a device it is a local folder.
Writes are atomic: a killed process leaves the previous state, never half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, partition_id: int) -> Path:
        return self.root / f"client_{partition_id:06d}.pt"

    def load(self, partition_id: int) -> dict[str, Any] | None:
        path = self.path(partition_id)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        """Forget every client's state (a new run starts from scratch)."""
        for path in self.root.glob("client_*.pt"):
            path.unlink()

    def save(self, partition_id: int, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, self.path(partition_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
