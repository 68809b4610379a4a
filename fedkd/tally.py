"""The reply tally: one round's replies checked, counted and summarised.

Every reply either passes the checks and joins `valid` (sorted by partition id
before aggregation, since float sums depend on order) or is counted: a client's
error in `failed`, a reply the checks refuse in `rejected` (one log line naming the
node and why), a sampled client that never answered in `late`. `returning` holds the
partitions that replied validly in an earlier round (the server state keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedkd.comm.codecs import payload_bytes
from fedkd.protocol import INFO, ClientReply, InvalidReply
from fedkd.reply_checks import ReplyLimits, check_reply
from fedkd.round import Round

log = logging.getLogger("fedkd.server")


@dataclass
class Reply:
    """What came back from one node: its content, or the error it reported."""

    node: int
    partition_id: int | None  # None: a node the handshake did not admit
    content: RecordDict | None = None
    error: str | None = None


@dataclass
class ReplyTally:
    round: Round
    check_payload: Callable[[Round, RecordDict], Any]
    limits: ReplyLimits  # what a reply of this round may hold (fedkd/reply_checks.py)
    declared: dict[int, int] = field(default_factory=dict)  # shard sizes, from the handshake
    returning: set[int] = field(default_factory=set)  # partitions valid in an earlier round
    valid: list[ClientReply] = field(default_factory=list)
    failed: int = 0
    rejected: int = 0
    late: int = 0
    bytes_up: int = 0

    def add(self, reply: Reply) -> None:
        rnd = self.round.number
        if reply.error is not None:
            self.failed += 1
            log.warning("round %d: client error from node %s: %s", rnd, reply.node, reply.error)
            return
        content = reply.content
        size = 0  # bytes of arrays received, valid or not
        if isinstance(content, RecordDict):
            size = sum(payload_bytes(r) for r in content.array_records.values())
        self.bytes_up += size
        try:
            self.valid.append(self.parse(reply.partition_id, content, reply.node, size))
        except Exception as exc:
            self.rejected += 1
            why = exc if isinstance(exc, InvalidReply) else f"{type(exc).__name__}: {exc}"
            log.warning("round %d: rejected reply from node %s: %s", rnd, reply.node, why)

    def parse(
        self, pid: int | None, content: RecordDict, node: int | None, size: int
    ) -> ClientReply:
        """Validate one client's upload; raise InvalidReply, naming what is wrong."""
        if pid is None:
            raise InvalidReply(f"unknown node {node}")
        sampled = self.round.sampled
        if sampled and pid not in sampled:
            raise InvalidReply(f"partition {pid} was not sampled this round")
        if any(r.partition_id == pid for r in self.valid):
            raise InvalidReply(f"second reply from partition {pid}")
        limits = replace(
            self.limits, max_examples=self.declared.get(pid), returning=pid in self.returning
        )
        metrics = check_reply(content, limits, size)
        payload = self.check_payload(self.round, content)
        info = {k: str(v) for k, v in content.config_records.get(INFO, {}).items()}
        upload = content.array_records.get(self.limits.payload) if self.limits.payload else None
        return ClientReply(pid, int(metrics["num-examples"]), metrics, payload, size, info, upload)

    def close(self, received: int) -> list[ClientReply]:
        """After the last reply: count the missing ones; the valid ones in partition order."""
        self.late = max(0, len(self.round.sampled) - received)
        self.valid.sort(key=lambda r: r.partition_id)
        return self.valid

    def stats(self, skipped: bool) -> dict[str, Any]:
        """The round's client statistics (before the strategy's own)."""
        valid = self.valid

        def values(key: str) -> list[float]:
            return [float(r.metrics[key]) for r in valid if key in r.metrics]

        accs, losses = values("test-accuracy"), values("train-loss")
        compute = values("compute-seconds")
        return {
            "clients": len(self.round.sampled),
            "replies": len(valid),
            "rejected": self.rejected,
            "failed": self.failed,
            "late": self.late,
            "skipped": int(skipped),
            "bytes_up": self.bytes_up,
            "bytes_down": self.round.bytes_down,
            "client_accuracy_mean": float(np.mean(accs)) if accs else None,
            "client_accuracy_min": float(np.min(accs)) if accs else None,
            "client_accuracy_max": float(np.max(accs)) if accs else None,
            "client_loss_mean": float(np.mean(losses)) if losses else None,
            "client_compute_seconds": float(np.sum(compute)) if compute else None,
        }

    def student_task_accuracy(self) -> list[float] | None:
        """The students' mean accuracy per task (lifelong runs), or None."""
        rows = [r.metrics["task-accuracy"] for r in self.valid if "task-accuracy" in r.metrics]
        return [float(v) for v in np.mean(np.array(rows), axis=0)] if rows else None
