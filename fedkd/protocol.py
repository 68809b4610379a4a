"""The message format between ServerApp and ClientApp, in one place.

Down (message type "train"): a ConfigRecord "config" (`RoundPlan`), and optionally
an ArrayRecord "teacher" (soft labels on the round's proxy subset) or "weights"
(a model, for weight-sharing strategies), and in lifelong runs with
`student_memory` an ArrayRecord "memory" (soft labels on past tasks' proxy items that
`plan.memory` names). Proxy *images* never travel: the client
rebuilds the subset from its segments (pool task, seed, count).

Up: a MetricRecord "metrics" (`num-examples`, `train-loss`, `test-accuracy`) and,
depending on `reply`, an ArrayRecord "knowledge" (logits on the proxy subset) or
"weights".

Message type "query" asks a node which partition it holds (the handshake before
round 1), because node ids are random while sampling is over partition ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedkd.comm.npy import array_to_numpy
from fedkd.seeding import numpy_rng, sample_rows
from fedkd.training import LocalTraining

TRAIN = "train"
QUERY = "query"

CONFIG = "config"
TEACHER = "teacher"
MEMORY = "memory"  # soft labels on past tasks' items a student rehearses (plan.memory)
WEIGHTS = "weights"
KNOWLEDGE = "knowledge"
METRICS = "metrics"
INFO = "info"  # ConfigRecord up: where the client ran (host, Ray node)
SOFT_LABELS = "soft-labels"
LOGITS = "logits"

REPLY_LOGITS = "logits"
REPLY_WEIGHTS = "weights"
REPLY_NONE = "none"


@dataclass(frozen=True)
class ProxySegment:
    """`count` proxy items drawn with `seed` from the pool of task `task`."""

    task: int
    seed: int
    count: int


ROLE_LEARN = "learn"  # CE on the current task + KD toward the teacher on the proxy
ROLE_REVIEW = "review"  # KD only, toward what the federation knew (lifelong review)


# RoundPlan fields that travel as several keys: segment lists (tasks, seeds, counts),
# and the training's own fields
SEGMENTS = ("proxy", "teacher_proxy", "memory")
SEGMENTED = ("training", *SEGMENTS)


@dataclass(frozen=True)
class RoundPlan:
    """Everything a client needs to know about its work this round."""

    round: int
    task: int
    role: str
    reply: str  # REPLY_LOGITS | REPLY_WEIGHTS | REPLY_NONE
    proxy: tuple[ProxySegment, ...]
    codec: str
    training: LocalTraining  # on the wire as its fields, one key each
    teacher_codec: str = "float16"  # the teacher's soft labels; `codec` is for uploads
    teacher_count: int = -1  # soft labels on a seeded sample of this many items; -1: all
    teacher_seed: int = 0
    # the proxy items the teacher's labels are for, when not the round's own (the
    # previous round's consensus, strategy.broadcast=consensus); empty: `proxy`
    teacher_proxy: tuple[ProxySegment, ...] = ()
    # past tasks' proxy items whose soft labels come in the MEMORY record, for the
    # student to rehearse (mitigation student_memory); empty: none
    memory: tuple[ProxySegment, ...] = ()

    def teacher_rows(self, n: int) -> np.ndarray:
        """Which of the round's n proxy items the teacher's soft labels are for."""
        return download_rows(n, self.teacher_count, self.teacher_seed)

    def to_record(self) -> ConfigRecord:
        values: dict = {}
        for f in fields(self):
            if f.name not in SEGMENTED:
                values[_key(f.name)] = getattr(self, f.name)
        for f in fields(LocalTraining):
            values[_key(f.name)] = getattr(self.training, f.name)
        for name in SEGMENTS:
            prefix, segments = _key(name), getattr(self, name)
            values[f"{prefix}-tasks"] = [s.task for s in segments]
            values[f"{prefix}-seeds"] = [s.seed for s in segments]
            values[f"{prefix}-counts"] = [s.count for s in segments]
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        values = {f.name: record[_key(f.name)] for f in fields(cls) if f.name not in SEGMENTED}
        values["training"] = LocalTraining(
            **{f.name: record[_key(f.name)] for f in fields(LocalTraining)}
        )
        for name in SEGMENTS:
            prefix = _key(name)
            segments = zip(
                record[f"{prefix}-tasks"],
                record[f"{prefix}-seeds"],
                record[f"{prefix}-counts"],
                strict=True,
            )
            values[name] = tuple(ProxySegment(int(t), int(s), int(c)) for t, s, c in segments)
        return cls(**values)

    @property
    def proxy_count(self) -> int:
        return sum(s.count for s in self.proxy)


def proxy_subset(seed: int, pool_size: int, count: int) -> np.ndarray:
    """Indices into a proxy pool: all of it in order, or a seeded sample."""
    return sample_rows(numpy_rng(seed), pool_size, count)


def download_rows(n: int, count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` of a round's n proxy items (all of them if count < 0)."""
    return proxy_subset(seed, n, n if count < 0 else count)


def _key(name: str) -> str:
    return name.replace("_", "-")


class InvalidReply(ValueError):
    """A client reply the server will not aggregate; the message says why."""


@dataclass
class ClientReply:
    """A validated reply, ready to aggregate."""

    partition_id: int
    num_examples: int
    metrics: dict[str, float]
    arrays: Any  # what the strategy's check_payload returned (a record or its decoding)
    bytes_up: int
    info: dict[str, str] = field(default_factory=dict)


def check_array(
    record: ArrayRecord, key: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Return record[key] as numpy after checking shape, dtype and finiteness."""
    if key not in record:
        raise InvalidReply(f"missing array {key!r}")
    try:
        arr = array_to_numpy(record[key], dtype, shape)
    except Exception as exc:  # malformed bytes from a client
        first = str(exc).split(". ")[0] or type(exc).__name__
        raise InvalidReply(f"array {key!r} cannot be decoded: {first}") from None
    if arr.dtype != dtype:
        raise InvalidReply(f"array {key!r} has dtype {arr.dtype}, expected {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise InvalidReply(f"array {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InvalidReply(f"array {key!r} holds NaN or Inf")
    return arr
