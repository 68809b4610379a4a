"""The server's checkpoint: written atomically after every round, read on resume.

`checkpoint.pt` in the run directory holds what the server needs to continue after
round r (the strategy's state, the mitigation's memory, the lifelong trackers, the
privacy ledger, RNG states: `ServerState.state_dict`, fedkd/server_state.py).
Clients keep their own state in the client store, which survives too. Every random
stream is derived from (seed, round, partition id), so round r + 1 replays
identically after a resume.

Run directories are shared between people, so a checkpoint is read with
`weights_only=True` only (`read_checkpoint`): tensors and plain values are rebuilt,
and a pickled object that would run code is refused without being run.
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

# What `ServerState.state_dict` holds besides "round" and "config_digest".
PARTS = ("strategy", "state", "mitigation", "evaluation", "privacy")
RNG = ("ray_nodes", "torch_rng", "numpy_rng")


class CheckpointError(FedKDError):
    """A checkpoint that is missing, unreadable or from another configuration."""


def config_digest(cfg: dict[str, Any]) -> str:
    """A fingerprint of the settings that determine a run's results."""
    kept = {k: v for k, v in cfg.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def _reason(exc: BaseException) -> str:
    """The first sentence of torch's multi-line load errors (none of its advice on
    how to load the file anyway)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = [ln for ln in lines if not ln.startswith(("Check the documentation", "Please"))]
        last = detail[-1] if len(detail) > 1 else "a pickled object"
        last = last.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
        return f"holds more than tensors and plain values, not loaded: {last.split('. ')[0]}"
    return lines[0].split(". ")[0][:200] if lines else type(exc).__name__


def _damaged_entry(path: Path) -> str | None:
    """The first entry of torch's zip archive whose CRC does not match (bytes changed
    after writing); torch itself reads tensor data without checking it."""
    if not zipfile.is_zipfile(path):
        return None  # truncated or not torch's format: torch.load says what is wrong
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        return str(exc) or type(exc).__name__


def read_checkpoint(path: Path) -> Any:
    """The contents of a checkpoint file, rebuilt by torch's safe (weights-only) loader
    once every byte is checked against the archive's CRCs."""
    damaged = _damaged_entry(path)
    if damaged is not None:
        raise CheckpointError(f"{path}: unreadable checkpoint (damaged: {damaged})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        TypeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_reason(exc)})") from None


def load_checkpoint(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `run_dir`, checked against the run's config."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (was output.checkpoint false?)")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "config_digest" not in ckpt or "round" not in ckpt:
        raise CheckpointError(f"{path}: not a fedkd checkpoint")
    if ckpt["config_digest"] != config_digest(cfg):
        raise CheckpointError(
            f"{path}: written by a run with other settings than {run_dir}/config.yaml"
        )
    if (Path(run_dir) / "summary.json").exists():
        raise CheckpointError(f"{run_dir}: the run already finished (it has a summary.json)")
    rnd = ckpt["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd <= int(cfg["rounds"]):
        raise CheckpointError(f"{path}: damaged checkpoint (round {rnd!r})")
    missing = [key for key in (*PARTS, *RNG) if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint (no {', '.join(missing)})")
    return ckpt
