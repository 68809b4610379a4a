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

import math
import re
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

# the reply kinds of the built-in strategies; a strategy may declare its own
# (`Strategy.reply_kind`): on the wire a kind is a short name (REPLY_NAME), and a
# device replies only with kinds its owner allows (fedkd/node_policy.py)
REPLY_LOGITS = "logits"
REPLY_WEIGHTS = "weights"
REPLY_NONE = "none"
REPLY_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class ProxySegment:
    """`count` proxy items drawn with `seed` from the pool of task `task`."""

    task: int
    seed: int
    count: int


ROLE_LEARN = "learn"  # CE on the current task + KD toward the teacher on the proxy
ROLE_REVIEW = "review"  # KD only, toward what the federation knew (lifelong review)
ROLES = (ROLE_LEARN, ROLE_REVIEW)


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
        """The plan in a server's ConfigRecord, every field type- and range-checked
        (a server is untrusted on a device): InvalidPlan names the first bad key."""
        values = {
            f.name: _field(record, f.name, f.type) for f in fields(cls) if f.name not in SEGMENTED
        }
        values["training"] = LocalTraining(
            **{f.name: _field(record, f.name, f.type) for f in fields(LocalTraining)}
        )
        for name in SEGMENTS:
            prefix = _key(name)
            columns = [
                _int_list(record, f"{prefix}-{part}") for part in ("tasks", "seeds", "counts")
            ]
            if len({len(c) for c in columns}) != 1:
                raise InvalidPlan(f"{prefix}-tasks, -seeds and -counts differ in length")
            values[name] = tuple(ProxySegment(t, s, c) for t, s, c in zip(*columns, strict=True))
        plan = cls(**values)
        plan.check()
        return plan

    def check(self) -> None:
        """Ranges a well-formed plan keeps (InvalidPlan names the key)."""
        from fedkd.comm.codecs import CODECS

        t = self.training
        for ok, key, allowed in (
            (self.round >= 1, "round", "an integer >= 1"),
            (self.task >= 0, "task", "an integer >= 0"),
            (self.role in ROLES, "role", " or ".join(ROLES)),
            (bool(REPLY_NAME.fullmatch(self.reply)), "reply", "a reply kind's name"),
            (self.codec in CODECS, "codec", "a codec name"),
            (self.teacher_codec in CODECS, "teacher-codec", "a codec name"),
            (self.teacher_count >= -1, "teacher-count", "an integer >= -1"),
            (t.epochs >= 0 and t.kd_epochs >= 0, "epochs", "integers >= 0"),
            (t.batch_size >= 1 and t.kd_batch_size >= 1, "batch-size", "integers >= 1"),
            (t.schedule in ("joint", "sequential"), "schedule", "joint or sequential"),
            (0.0 <= t.alpha <= 1.0, "alpha", "a number in [0, 1]"),
            (t.temperature > 0, "temperature", "a number > 0"),
            (min(t.lr, t.kd_lr, t.momentum, t.weight_decay) >= 0, "lr", "numbers >= 0"),
        ):
            if not ok:
                raise InvalidPlan(f"{key} must be {allowed}")
        for name in SEGMENTS:
            if any(s.task < 0 or s.count < 0 for s in getattr(self, name)):
                raise InvalidPlan(f"{_key(name)} tasks and counts must be >= 0")

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


class InvalidPlan(ValueError):
    """A round plan from the server that is malformed; the message names the key."""

    def __init__(self, why: str) -> None:
        super().__init__(f"malformed round plan: {why}")


def _field(record: ConfigRecord, name: str, kind: str) -> Any:
    """record[key of name] if it has the field's type (int is not bool, a float may
    be written as an int); InvalidPlan otherwise."""
    key = _key(name)
    if key not in record:
        raise InvalidPlan(f"no {key!r}")
    value = record[key]
    if kind == "int" and type(value) is int:
        return value
    if kind == "float" and type(value) in (int, float) and math.isfinite(value):
        return float(value)
    if kind == "str" and isinstance(value, str) and len(value) <= 64:
        return value
    if kind == "bool" and type(value) is bool:
        return value
    want = {"int": "an integer", "float": "a finite number", "str": "a short string"}
    raise InvalidPlan(f"{key!r} must be {want.get(kind, 'a ' + kind)}, not {value!r:.40}")


def _int_list(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise InvalidPlan(f"{key!r} must be a list of integers")
    return value


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
    upload: ArrayRecord | None = None  # the payload record as received (the privacy layer's)


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
