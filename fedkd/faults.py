"""Injected client faults, for testing that runs survive them (`conf/faults/`).

Each sampled client draws its fault for the round from (seed, round, partition id),
so a faulty run is as reproducible as a clean one:

- crash: the client raises before its round's work is saved (Flower returns an
  error reply; the server counts it in `failed`);
- straggler: the client sleeps `faults.straggler_delay` seconds before replying
  (with `simulation.round_timeout` shorter than that, the server counts it `late`);
- corrupt: the reply's knowledge is NaN or random bytes (the server's checks reject
  it and count it in `rejected`).

Hostile clients (`hostile_fraction`, fedkd/hostile.py) rewrite their replies into
malformed or hostile ones of many kinds, to test the server's checks.

Adversaries are different: a fixed, seeded set of `faults.adversarial_fraction` of
the partitions send well-formed but hostile logits every round (`flipped`: the
negated logits, `uniform`: all equal, `extreme`: +-1000 on a random class). Nothing
rejects them; robust aggregation (`strategy.aggregator`) is what limits them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedkd.hostile import hostile_partitions, rewrite_reply, round_kind
from fedkd.seeding import derive_seed, numpy_rng

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig

CRASH, STRAGGLE, CORRUPT = "crash", "straggle", "corrupt"
CORRUPT_MODES = ("nan", "garbage")
ADVERSARIAL_MODES = ("flipped", "uniform", "extreme")


class InjectedCrash(RuntimeError):
    """A client failure that fedkd injected on purpose."""


def round_fault(cfg: FedKDConfig, rnd: int, pid: int) -> str | None:
    """The fault partition `pid` suffers in round `rnd` (None: none)."""
    f = cfg.faults
    u = numpy_rng(cfg.seed, rnd, pid, "fault").random()
    for name, p in ((CRASH, f.client_crash_prob), (STRAGGLE, f.straggler_prob)):
        if u < p:
            return name
        u -= p
    return CORRUPT if u < f.corrupt_prob else None


def adversaries(cfg: FedKDConfig) -> set[int]:
    """The partitions that send hostile knowledge: fixed for the run, seeded."""
    n, frac = cfg.num_clients, cfg.faults.adversarial_fraction
    k = round(n * frac)
    return set(numpy_rng(cfg.seed, "adversaries").choice(n, size=k, replace=False).tolist())


def before_round(cfg: FedKDConfig, rnd: int, pid: int) -> None:
    """Crash or stall the client, if that is its fault this round."""
    fault = round_fault(cfg, rnd, pid)
    if fault == CRASH:
        raise InjectedCrash(f"injected crash of partition {pid} in round {rnd}")
    if fault == STRAGGLE:
        time.sleep(cfg.faults.straggler_delay)


def hostile_logits(logits: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """Well-formed logits that mislead: the adversary's reply."""
    if mode == "flipped":
        return -logits
    if mode == "uniform":
        return torch.zeros_like(logits)
    if mode == "extreme":
        gen = torch.Generator().manual_seed(seed)
        cls = torch.randint(logits.shape[1], (logits.shape[0],), generator=gen)
        out = torch.full_like(logits, -1000.0)
        out[torch.arange(logits.shape[0]), cls] = 1000.0
        return out
    raise ValueError(f"unknown adversarial mode {mode!r}")


def corrupt_reply(cfg: FedKDConfig, rnd: int, pid: int, content: RecordDict, key: str) -> None:
    """Replace every array of the reply's `key` record with NaN or random bytes."""
    if key not in content.array_records:
        return
    mode = cfg.faults.corrupt_mode
    rng = numpy_rng(cfg.seed, rnd, pid, "corrupt")
    record = content.array_records[key]
    bad = ArrayRecord()
    for name in list(record.keys()):
        arr = record[name]
        floating = np.issubdtype(np.dtype(arr.dtype), np.floating)
        if mode == "nan" and floating:
            bad[name] = Array(np.full(tuple(arr.shape), np.nan, arr.dtype))
        else:  # garbage, or integer arrays, which cannot hold NaN
            garbage = Array(np.zeros(1, np.uint8))
            garbage.data = rng.bytes(max(1, len(arr.data)))
            garbage.dtype, garbage.shape = arr.dtype, arr.shape
            bad[name] = garbage
    content.array_records[key] = bad


def after_round(
    cfg: FedKDConfig, rnd: int, pid: int, content: RecordDict, key: str, recode_logits
) -> None:
    """Turn an adversary's knowledge hostile, or corrupt the reply, in place.

    `recode_logits(record, transform)` rewrites the logits in the reply's codec (see
    comm.codecs.recode); None for replies that carry weights, which adversaries leave
    alone."""
    f = cfg.faults
    if recode_logits is not None and key in content.array_records and pid in adversaries(cfg):
        seed = derive_seed(cfg.seed, rnd, pid, "adversary")
        content.array_records[key] = recode_logits(
            content.array_records[key],
            lambda logits: hostile_logits(logits, f.adversarial_mode, seed),
        )
    if round_fault(cfg, rnd, pid) == CORRUPT:
        corrupt_reply(cfg, rnd, pid, content, key)
    if pid in hostile_partitions(cfg.seed, cfg.num_clients, f.hostile_fraction):
        kind = round_kind(cfg.seed, rnd, pid, list(f.hostile_kinds))
        rewrite_reply(content, key, kind, cfg.seed, rnd, pid, recode_logits)
