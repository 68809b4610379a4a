"""The server's checkpoint: written atomically after every round, read on resume.

`checkpoint.pt` in the run directory holds what the server needs to continue after
round r (the strategy's state, the mitigation's memory, the lifelong trackers, the
privacy ledger, RNG states: `ServerState.state_dict`, fedkd/server_state.py).
Clients keep their own state in the client store, which survives too. Every random
stream is derived from (seed, round, partition id), so round r + 1 replays
identically after a resume.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fedkd.atomic import write_atomic
from fedkd.errors import FedKDError

CHECKPOINT = "checkpoint.pt"

# Settings that may differ between a run and its resumption: where things are written
# and how much is shown. Everything else must match the checkpoint.
RESUMABLE = ("simulation", "output")


class CheckpointError(FedKDError):
    """A checkpoint that is missing, unreadable or from another configuration."""


def config_digest(cfg: dict[str, Any]) -> str:
    """A fingerprint of the settings that determine a run's results."""
    kept = {k: v for k, v in cfg.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `run_dir`, checked against the run's config."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (was output.checkpoint false?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "config_digest" not in ckpt or "round" not in ckpt:
        raise CheckpointError(f"{path}: not a fedkd checkpoint")
    if ckpt["config_digest"] != config_digest(cfg):
        raise CheckpointError(
            f"{path}: written by a run with other settings than {run_dir}/config.yaml"
        )
    if (Path(run_dir) / "summary.json").exists():
        raise CheckpointError(f"{run_dir}: the run already finished (it has a summary.json)")
    return ckpt
