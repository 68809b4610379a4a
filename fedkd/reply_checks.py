"""The one boundary for everything a client sends to the server.

A reply is a RecordDict from a party that may be buggy or hostile. Before the
server reads any of it, `check_reply` makes sure that it holds only the records the
round's plan asked for, within a byte budget derived from the plan (the whole reply:
arrays, metrics and info), and that every metric has the right type and range
(`METRICS`): numbers are numbers, counts are bounded integers (`num-examples` at most
what the node declared in the handshake, the round an integer), lists have one entry
per task, a few short keys of a mitigation's own, and `initial-task-accuracy` only in
a client's first participation (it is the baseline of forward transfer). The
strategy's `check_payload` then checks the arrays (dtype, shape, and, after
decoding, finite values within `VALUE_BOUND`: fedkd/comm/codecs.py). Anything else
raises `InvalidReply`, which the tally counts as a rejected reply; any other
exception from a reply is treated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flwr.app import RecordDict

from fedkd.comm.codecs import VALUE_BOUND
from fedkd.protocol import INFO, METRICS, InvalidReply

METADATA_BYTES = 64 * 1024  # headroom over the payload for keys, metrics and info
INFO_KEYS = ("host", "ray-node")
MAX_TEXT = 256  # characters of an info value
MAX_EXTRA_METRICS = 16  # metrics of a mitigation's own (replay-samples, ...) per reply
MAX_KEY = 64  # characters of such a metric's name
NAMES_SHOWN, NAME_CHARS = 5, 40  # of unexpected record names, in a rejection line


def _number(key: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise InvalidReply(f"metric {key!r} must be {what}, got {type(value).__name__}")
    if math.isnan(value) or not low <= value <= high:
        raise InvalidReply(f"metric {key!r} must lie in [{low:g}, {high:g}], got {value!r}")
    return value


def _accuracies(key: str, value: Any, num_tasks: int) -> list[float]:
    if not isinstance(value, list) or len(value) != num_tasks:
        raise InvalidReply(f"{key} must list {num_tasks} accuracies, got {str(value)[:80]}")
    return [_number(key, v, 0.0, 1.0) for v in value]


# metric -> (low, high, integer); each is optional unless the reply kind needs it
SCALARS: dict[str, tuple[float, float, bool]] = {
    "train-loss": (0.0, 1e9, False),  # finite: a diverged client teaches nothing
    "test-accuracy": (0.0, 1.0, False),
    "compute-seconds": (0.0, 1e9, False),
    "dp-epsilon": (0.0, math.inf, False),  # inf: DP-SGD with zero noise
    "dp-secure-noise": (0, 1, True),  # 1: the client's DP noise came from its OS CSPRNG
}
TASK_LISTS = ("task-accuracy", "initial-task-accuracy")
INITIAL = "initial-task-accuracy"  # b_j: only from a student that is new
COUNTS = ("num-examples", "round")  # checked first, against the handshake and the round


@dataclass(frozen=True)
class ReplyLimits:
    """What one reply of this round may hold."""

    round: int
    payload: str | None  # the ArrayRecord the plan asks for (None: metrics only)
    max_payload_bytes: int  # a well-formed payload of this round, in bytes
    num_tasks: int
    max_examples: int | None  # the node's shard size, as declared in the handshake
    returning: bool = False  # the client replied validly in an earlier round


def check_reply(content: RecordDict, limits: ReplyLimits, size: int) -> dict[str, Any]:
    """Check a reply (`size`: the bytes of its arrays) and its metrics; returns its
    metrics. Raise InvalidReply."""
    if not isinstance(content, RecordDict):
        raise InvalidReply(f"not a RecordDict but {type(content).__name__}")
    _records(content, limits, size)
    _info(content)
    return _metrics(content, limits)


def names(found: set[str]) -> str:
    """A few of `found`, each cut short: a rejection stays one short line."""
    shown = [str(n)[:NAME_CHARS] for n in sorted(found, key=str)[:NAMES_SHOWN]]
    more = len(found) - len(shown)
    return str(shown) + (f" and {more} more" if more > 0 else "")


def _records(content: RecordDict, limits: ReplyLimits, size: int) -> None:
    arrays = set(content.array_records)
    allowed = {limits.payload} - {None}
    if arrays - allowed:
        raise InvalidReply(f"unexpected ArrayRecord(s) {names(arrays - allowed)}")
    if set(content.metric_records) != {METRICS}:
        raise InvalidReply(
            f"expected one MetricRecord {METRICS!r}, got {names(set(content.metric_records))}"
        )
    if set(content.config_records) - {INFO}:
        raise InvalidReply(
            f"unexpected ConfigRecord(s) {names(set(content.config_records) - {INFO})}"
        )
    total = size + sum(map(record_bytes, content.metric_records.values()))
    total += sum(map(record_bytes, content.config_records.values()))
    cap = limits.max_payload_bytes + METADATA_BYTES
    if total > cap:
        raise InvalidReply(f"{total} bytes in the reply, more than this round allows ({cap})")


def record_bytes(record: Any) -> int:
    """A metric or config record's size: its keys, 8 bytes a number, text by length."""
    return sum(len(str(key)) + _value_bytes(value) for key, value in record.items())


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return len(value) if isinstance(value, str | bytes) else 8


def _info(content: RecordDict) -> None:
    info = content.config_records.get(INFO)
    if info is None:
        return
    for key, value in info.items():
        if key not in INFO_KEYS or not isinstance(value, str) or len(value) > MAX_TEXT:
            raise InvalidReply(f"info {key!r} must be one of {INFO_KEYS}, a short string")


def _metrics(content: RecordDict, limits: ReplyLimits) -> dict[str, Any]:
    metrics = dict(content.metric_records[METRICS])
    high = limits.max_examples if limits.max_examples is not None else 2**31
    _number("num-examples", metrics.get("num-examples"), 1, high, integer=True)
    rnd = metrics.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int):
        raise InvalidReply(f"metric 'round' must be an integer, got {rnd!r}")
    if rnd != limits.round:
        raise InvalidReply(f"a reply for round {rnd!r} in round {limits.round}")
    if INITIAL in metrics and limits.returning:
        raise InvalidReply(f"{INITIAL} from a returning client (a new student's baseline)")
    _extra_keys([k for k in metrics if k not in (*SCALARS, *TASK_LISTS, *COUNTS)])
    for key, value in metrics.items():
        if key in SCALARS:
            low, up, integer = SCALARS[key]
            _number(key, value, low, up, integer)
        elif key in TASK_LISTS:
            _accuracies(key, value, limits.num_tasks)
        elif key not in COUNTS:  # a mitigation's own, e.g. replay-samples
            _number(key, value, -VALUE_BOUND, VALUE_BOUND)
    return metrics


def _extra_keys(keys: list[str]) -> None:
    """A mitigation reports a few counts of its own, under short names."""
    if len(keys) > MAX_EXTRA_METRICS:
        raise InvalidReply(
            f"{len(keys)} unknown metrics, more than {MAX_EXTRA_METRICS}: {names(set(keys))}"
        )
    for key in keys:
        if len(key) > MAX_KEY:
            raise InvalidReply(f"metric name {key[:NAME_CHARS]!r}... longer than {MAX_KEY}")
