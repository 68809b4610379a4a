"""Hostile clients, for testing the server's boundary (`faults.hostile_fraction`).

A fixed, seeded set of partitions trains as usual and then rewrites its reply into
one of `KINDS`, drawn per (seed, round, partition): malformed metrics, unexpected or
oversize records, arrays that are NaN, inf or out of range after decoding, codec
side-data out of range, replies meant for another round, floods of metrics,
poisoned BatchNorm statistics, or well-formed but hostile logits. Every kind except
the well-formed ones (`WELL_FORMED`) must be rejected by fedkd/reply_checks.py and
the strategy's `check_payload`; the well-formed ones are what robust aggregation
(`strategy.aggregator`) is for. `crash` sends nothing (the client raises): a run
whose hostile clients only crash is the same federation without them.

Some kinds depend on the client's history or handshake. `initial-accuracy-again`
is refused only from a client that already replied validly (its first valid reply
may carry a baseline). `DECLARED_HUGE` kinds claim `OVERSIZED` examples: refused
against an honest handshake; from a node that declared as much they are aggregated
with their weight share capped (and `weight-takeover`'s update clipped).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd.protocol import INFO, METRICS, WEIGHTS
from fedkd.seeding import numpy_rng

Rewrite = Callable[[RecordDict, str, "Context"], None]
OVERSIZED = 2**62  # examples a hostile node claims (and declares, if its handshake may)
FLOOD = 5000  # unknown metric keys in one reply


class Context:
    """What a rewrite may use: the round, a seeded RNG, the logits' recoder."""

    def __init__(self, rnd: int, rng: np.random.Generator, recode: Callable | None) -> None:
        self.round, self.rng, self.recode = rnd, rng, recode


class HostileCrash(RuntimeError):
    """A hostile client that sends nothing this round (logged as an injected crash)."""


def _metric(key: str, value: object) -> Rewrite:
    def rewrite(content: RecordDict, payload: str, ctx: Context) -> None:
        content.metric_records[METRICS][key] = value

    return rewrite


def _scaled_examples(content: RecordDict, payload: str, ctx: Context) -> None:
    m = content.metric_records[METRICS]
    m["num-examples"] = int(m["num-examples"]) * 1000  # more than the node declared


def _other_round(content: RecordDict, payload: str, ctx: Context) -> None:
    content.metric_records[METRICS]["round"] = ctx.round - 1


def _drop_round(content: RecordDict, payload: str, ctx: Context) -> None:
    del content.metric_records[METRICS]["round"]


def _float_round(content: RecordDict, payload: str, ctx: Context) -> None:
    content.metric_records[METRICS]["round"] = float(ctx.round)


def _metric_flood(content: RecordDict, payload: str, ctx: Context) -> None:
    content.metric_records[METRICS].update({f"x{i}": 1.0 for i in range(FLOOD)})


def _initial_again(content: RecordDict, payload: str, ctx: Context) -> None:
    m = content.metric_records[METRICS]
    m["initial-task-accuracy"] = [1.0] * len(m.get("task-accuracy", [0.0]))  # b_j once more


def _takeover(content: RecordDict, payload: str, ctx: Context) -> None:
    """Model replacement: weights far from the broadcast (8x the client's own: about 7
    times the broadcast's norm away, inside the refusal bound of 10), with a declared
    size that would own a weighted average."""
    content.metric_records[METRICS]["num-examples"] = OVERSIZED
    record = content.array_records.get(payload)
    if payload != WEIGHTS or record is None:
        return  # soft labels: the claim alone
    for key in list(record.keys()):
        arr = record[key].numpy()
        if np.issubdtype(arr.dtype, np.floating):
            record[key] = Array(np.ascontiguousarray(arr * 8))


def _batchnorm_poison(content: RecordDict, payload: str, ctx: Context) -> None:
    """A negative running variance and a batch count near int64's end; a reply with no
    BatchNorm buffers gets them as extra arrays."""
    record = content.array_records[payload]
    keys = list(record.keys())
    poison = {"running_var": np.float32(-1.0), "num_batches_tracked": np.int64(2**62)}
    for name, value in poison.items():
        found = [k for k in keys if k.rsplit(".", 1)[-1] == name] or [name]
        for key in found:
            shape = record[key].shape if key in record else (1,)
            record[key] = Array(np.full(shape, value, dtype=np.asarray(value).dtype))


def _drop_metrics(content: RecordDict, payload: str, ctx: Context) -> None:
    del content.metric_records[METRICS]


def _extra_metric_record(content: RecordDict, payload: str, ctx: Context) -> None:
    content.metric_records["more"] = MetricRecord({"num-examples": 10**9})


def _drop_payload(content: RecordDict, payload: str, ctx: Context) -> None:
    del content.array_records[payload]


def _extra_array_record(content: RecordDict, payload: str, ctx: Context) -> None:
    content.array_records["weights"] = ArrayRecord({"w": Array(np.zeros(16, np.float32))})


def _extra_array(content: RecordDict, payload: str, ctx: Context) -> None:
    content.array_records[payload]["extra"] = Array(np.zeros(16, np.float32))


def _oversize(content: RecordDict, payload: str, ctx: Context) -> None:
    record = content.array_records[payload]
    first = next(iter(record.keys()))
    big = np.zeros(max(1, len(record[first].data)) * 64, np.uint8)
    record[first] = Array(big)  # 64 times the round's payload, as one array


def _extra_config(content: RecordDict, payload: str, ctx: Context) -> None:
    content.config_records["config"] = ConfigRecord({"role": "server"})


def _info(key: str, value: str) -> Rewrite:
    def rewrite(content: RecordDict, payload: str, ctx: Context) -> None:
        content.config_records[INFO] = ConfigRecord({key: value})

    return rewrite


def _array(transform: Callable[[np.ndarray, np.random.Generator], np.ndarray], which: int = 0):
    """Replace the payload's `which`-th array (0: the values, 1: int8's range)."""

    def rewrite(content: RecordDict, payload: str, ctx: Context) -> None:
        record = content.array_records[payload]
        keys = sorted(record.keys())
        key = keys[min(which, len(keys) - 1)]
        record[key] = Array(np.ascontiguousarray(transform(record[key].numpy(), ctx.rng)))

    return rewrite


def _garbage(content: RecordDict, payload: str, ctx: Context) -> None:
    record = content.array_records[payload]
    key = sorted(record.keys())[0]
    arr = record[key]
    bad = Array(np.zeros(1, np.uint8))
    bad.data = ctx.rng.bytes(max(1, len(arr.data)))
    bad.dtype, bad.shape = arr.dtype, arr.shape
    record[key] = bad


def _drop_range(content: RecordDict, payload: str, ctx: Context) -> None:
    record = content.array_records[payload]
    for key in [k for k in record if k.endswith("-range")]:
        del record[key]


def _logits(transform: Callable[[torch.Tensor, np.random.Generator], torch.Tensor]) -> Rewrite:
    def rewrite(content: RecordDict, payload: str, ctx: Context) -> None:
        if ctx.recode is None:
            raise HostileCrash("no logits to rewrite")
        record = content.array_records[payload]
        content.array_records[payload] = ctx.recode(record, lambda z: transform(z, ctx.rng))

    return rewrite


def _extreme(z: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    out = torch.full_like(z, -1000.0)
    out[torch.arange(len(z)), torch.from_numpy(rng.integers(0, z.shape[1], len(z)))] = 1000.0
    return out


def _crash(content: RecordDict, payload: str, ctx: Context) -> None:
    raise HostileCrash(f"injected crash of a hostile client in round {ctx.round}")


KINDS: dict[str, Rewrite] = {
    "accuracy-as-list": _metric("test-accuracy", [0.5]),
    "loss-as-list": _metric("train-loss", [1.0]),
    "compute-as-list": _metric("compute-seconds", [1.0, 2.0]),
    "epsilon-as-list": _metric("dp-epsilon", [0.1]),
    "examples-huge": _metric("num-examples", 10**18),
    "examples-negative": _metric("num-examples", -5),
    "examples-zero": _metric("num-examples", 0),
    "examples-float": _metric("num-examples", 3.5),
    "examples-as-list": _metric("num-examples", [10]),
    "examples-over-declared": _scaled_examples,
    "accuracy-out-of-range": _metric("test-accuracy", 1.5),
    "accuracy-nan": _metric("test-accuracy", float("nan")),
    "loss-inf": _metric("train-loss", float("inf")),
    "loss-negative": _metric("train-loss", -1.0),
    "task-accuracy-wrong-length": _metric("task-accuracy", [0.5] * 7),
    "unknown-metric-list": _metric("extra", [1.0] * 1000),
    "another-round": _other_round,
    "round-as-float": _float_round,
    "metric-flood": _metric_flood,
    "initial-accuracy-again": _initial_again,
    "examples-oversized": _metric("num-examples", OVERSIZED),
    "weight-takeover": _takeover,
    "batchnorm-poison": _batchnorm_poison,
    "no-round": _drop_round,
    "no-metrics": _drop_metrics,
    "extra-metric-record": _extra_metric_record,
    "no-payload": _drop_payload,
    "extra-array-record": _extra_array_record,
    "extra-array": _extra_array,
    "oversize": _oversize,
    "extra-config-record": _extra_config,
    "info-huge": _info("host", "x" * 100_000),
    "info-unknown-key": _info("command", "rm -rf /"),
    "values-nan": _array(lambda a, r: np.full(a.shape, np.nan, np.float32)),
    "values-inf": _array(lambda a, r: np.full(a.shape, np.inf, np.float32)),
    "values-wrong-dtype": _array(lambda a, r: a.astype(np.float64)),
    "values-wrong-shape": _array(lambda a, r: a[: max(0, len(a) - 1)]),
    "values-garbage": _garbage,
    "range-huge": _array(lambda a, r: np.array([-3e38, 3e38], np.float32), which=1),
    "range-inverted": _array(lambda a, r: np.array([5.0, -5.0], np.float32), which=1),
    "range-nan": _array(lambda a, r: np.array([np.nan, 0.0], np.float32), which=1),
    "range-wrong-shape": _array(lambda a, r: np.zeros(3, np.float32), which=1),
    "no-range": _drop_range,
    "extreme-logits": _logits(_extreme),
    "flipped-logits": _logits(lambda z, r: -z),
    "uniform-logits": _logits(lambda z, r: torch.zeros_like(z)),
    "crash": _crash,
}
WELL_FORMED = ("extreme-logits", "flipped-logits", "uniform-logits")  # robust aggregation
SILENT = ("crash",)
INT8_ONLY = ("range-huge", "range-inverted", "range-nan", "range-wrong-shape", "no-range")
BATCHNORM_ONLY = ("batchnorm-poison",)  # poisons weights with BN buffers (else: extra arrays)
DECLARED_HUGE = ("examples-oversized", "weight-takeover")  # see the module docstring
HISTORY = ("initial-accuracy-again",)  # refused from a client that replied validly before


def hostile_partitions(seed: int, num_clients: int, fraction: float) -> set[int]:
    """The hostile partitions: fixed for the run, seeded."""
    k = round(num_clients * fraction)
    return set(numpy_rng(seed, "hostile").choice(num_clients, size=k, replace=False).tolist())


def round_kind(seed: int, rnd: int, pid: int, kinds: list[str]) -> str:
    """The kind a hostile partition sends in round `rnd` (a pure function)."""
    options = kinds or sorted(KINDS)
    return options[int(numpy_rng(seed, rnd, pid, "hostile-kind").integers(len(options)))]


def rewrite_reply(
    content: RecordDict, payload: str, kind: str, seed: int, rnd: int, pid: int, recode
) -> None:
    """Turn an honest reply into a hostile one of `kind`, in place."""
    ctx = Context(rnd, numpy_rng(seed, rnd, pid, "hostile-values"), recode)
    KINDS[kind](content, payload, ctx)
