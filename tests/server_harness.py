"""Shared helpers for the server-side tests: a ServerState built from the real config,
crafted client replies, and the strategy's aggregate captured as it returns."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedkd.protocol import CONFIG, KNOWLEDGE, LOGITS, METRICS, WEIGHTS, RoundPlan
from fedkd.round import Round
from fedkd.round_loop import conclude_round, prepare_round
from fedkd.server_state import ServerState, build_server_state
from fedkd.tally import Reply


def server_state(plain_cfg, *overrides: str) -> ServerState:
    """The server of the tiny run with `overrides`, every partition admitted."""
    cfg = plain_cfg(*overrides)
    state = build_server_state(cfg, "cpu")
    state.population = list(range(cfg["num_clients"]))
    return state


def node_of(pid: int) -> int:
    """The node id the tests give partition `pid`."""
    return 100 + pid


def reply(pid: int, content: RecordDict) -> Reply:
    """A reply from the node holding partition `pid`."""
    return Reply(node_of(pid), pid, content)


def logits_content(logits, n=50, dtype=np.float16, metrics=None, rnd=1) -> RecordDict:
    """A soft-label client's upload: metrics and its logits on the round's proxy items."""
    if metrics is None:
        metrics = {"round": rnd, "num-examples": n, "test-accuracy": 0.5}
    return RecordDict(
        {
            METRICS: MetricRecord(metrics),
            KNOWLEDGE: ArrayRecord({LOGITS: Array(np.asarray(logits, dtype=dtype))}),
        }
    )


def weights_content(weights: dict[str, torch.Tensor], n: int = 10, rnd: int = 1) -> RecordDict:
    """A weight-sharing client's upload: metrics and its model's state dict."""
    metrics = MetricRecord({"round": rnd, "num-examples": n})
    return RecordDict({METRICS: metrics, WEIGHTS: ArrayRecord(weights)})


def rand_logits(r: Round, seed: int) -> np.ndarray:
    """Random float16 logits of the shape round `r` expects from a client."""
    return np.random.default_rng(seed).normal(0, 2, r.knowledge_shape).astype(np.float16)


def plans_of(downloads: list[tuple[int, RecordDict]]) -> list[RoundPlan]:
    """The RoundPlan each download carries, in download order."""
    return [RoundPlan.from_record(content.config_records[CONFIG]) for _, content in downloads]


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of a model's state dict (to compare with after a round)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


class Captured:
    """What `strategy.aggregate` returned, call by call."""

    def __init__(self) -> None:
        self.calls: list[tuple[ArrayRecord | None, dict[str, Any]]] = []

    @property
    def target(self) -> ArrayRecord | None:
        """The last aggregate returned; None if `aggregate` was never called."""
        return self.calls[-1][0] if self.calls else None


def capture(state: ServerState) -> Captured:
    """Record every return value of `state.strategy.aggregate` from now on."""
    captured = Captured()
    aggregate = state.strategy.aggregate

    def wrapped(r, replies):
        out = aggregate(r, replies)
        captured.calls.append(out)
        return out

    state.strategy.aggregate = wrapped
    return captured


def logits_round(
    state: ServerState, rnd: int
) -> tuple[Round, list[tuple[int, RecordDict]], dict[str, Any]]:
    """Round `rnd` with every sampled client replying random logits (seeded by its
    position in the round); returns the round, the downloads and the round's stats."""
    r, downloads = prepare_round(state, rnd)
    replies = [
        reply(pid, logits_content(rand_logits(r, i), rnd=rnd))
        for i, (pid, _) in enumerate(downloads)
    ]
    return r, downloads, conclude_round(state, r, replies)
