"""What a client may say about itself under DP; everything else is withheld.

The accountant covers one mechanism per mode, so a reply may carry only what that
mechanism protects, or what is post-processing of it, or what is public anyway:

- `privacy.mode=sample` protects one private example. The student is trained with
  DP-SGD, so whatever is computed from the student and public data is
  post-processing: its soft labels on the proxy set, its accuracy on the public
  test set. The exact loss on private batches and the time spent on them are not:
  withheld. The shard size stays public, as in Opacus (the sampling rate
  q = batch / n is accounted openly).
- `privacy.mode=client` protects a client's whole shard, and only the clipped
  upload is noised (on the server). A student's accuracy, loss and timing, a
  mitigation's counts, even the shard size describe that shard without noise:
  withheld, and `num-examples` is sent as 1 (in the handshake too). What stays is
  the untrained student's accuracy (a function of the seed and public data).

`summary.json` lists what was withheld (`dp_withheld`), so nobody mistakes a
missing student accuracy for a bug.
"""

from __future__ import annotations

from typing import Any

# metrics a reply may carry, per privacy mode (None: all of them)
RELEASABLE: dict[str, frozenset[str] | None] = {
    "none": None,
    "sample": frozenset(
        {
            "round",
            "num-examples",
            "test-accuracy",
            "task-accuracy",
            "initial-task-accuracy",
            "dp-epsilon",
            "dp-secure-noise",
        }
    ),
    "client": frozenset({"round", "num-examples", "initial-task-accuracy"}),
}
# what a client reports without DP, for the summary's list of what was withheld
REPORTED = (
    "train-loss",
    "test-accuracy",
    "task-accuracy",
    "compute-seconds",
    "num-examples",
    "mitigation metrics (e.g. replay-samples)",
)


def releasable(mode: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a reply that `mode` lets leave the client."""
    allowed = RELEASABLE[mode]
    if allowed is None:
        return dict(metrics)
    out = {k: v for k, v in metrics.items() if k in allowed}
    if mode == "client" and "num-examples" in out:
        out["num-examples"] = 1  # the shard size is the client's own data
    return out


def shard_size(mode: str, n: int) -> int:
    """The shard size a client declares in the handshake."""
    return 1 if mode == "client" else n


def withheld(mode: str) -> list[str]:
    """What clients do not report under `mode` (for summary.json)."""
    allowed = RELEASABLE[mode]
    if allowed is None:
        return []
    out = [k for k in REPORTED if k not in allowed]
    return [*out, "num-examples (sent as 1)"] if mode == "client" else out
