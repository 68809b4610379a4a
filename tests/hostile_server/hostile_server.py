"""A malicious ServerApp (tests/test_hostile_server.py): it attacks the one fedkd
SuperNode of its federation and writes down everything it gets back, so the test
can check that nothing the device read, and no path of the device, ever reached it.

Run config:
    overrides       the run's settings as the device sees them (a run-config attack)
    plan-overrides  honest settings: the round plan is fedkd's own server code's
    attack          the run-config attack's name (one handshake query, then one
                    otherwise honest train message), or "plans": the handshake, one
                    honest round, then every plan attack of `plan_attacks`
    out-dir         received.jsonl: one JSON line per reply (its records: metrics,
                    configs, array bytes in base64) or error (code and reason)

The honest round is the server's round-1 plan numbered 2, so that a replay (2
again) and a round going backwards (1) reach the device's ledger after one
accepted round of this run; the other attacks are round 3 of a 3-round run, each
otherwise the honest plan, a few at a time.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

TRAIN, QUERY, CONFIG, TEACHER = "train", "query", "config", "teacher"
REPLY_TIMEOUT = 300.0
HONEST_ROUND = 2
BIG = 100_000  # segments in the segment-count attacks
PARALLEL = 8  # plan attacks in flight at once (each a ClientApp process of ~1 GB)


def honest_download(plan_overrides: str, out: Path) -> RecordDict:
    """The download an honest fedkd server sends partition 0 in round 1 (its plan
    and payload), built once and kept in `out` for the runs after."""
    cache = out / "honest-plan.json"
    if cache.exists():
        return RecordDict({CONFIG: ConfigRecord(json.loads(cache.read_text()))})
    from fedkd.compose import compose_config
    from fedkd.round_loop import prepare_round
    from fedkd.server_state import build_server_state

    cfg = compose_config(plan_overrides)
    state = build_server_state(cfg, "cpu")
    state.population = list(range(cfg["num_clients"]))
    _, downloads = prepare_round(state, 1)
    content = dict(downloads)[0]
    if not content.array_records:  # a round-1 plan alone: cheap to keep
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(content.config_records[CONFIG])))
        tmp.replace(cache)
    return content


def with_plan(content: RecordDict, **changes: Any) -> RecordDict:
    """`content` with its plan's keys changed (a value of `...` deletes the key)."""
    plan = dict(content.config_records[CONFIG])
    for key, value in changes.items():
        if value is ...:
            del plan[key]
        else:
            plan[key] = value
    out = RecordDict(dict(content.items()))
    out[CONFIG] = ConfigRecord(plan)
    return out


def with_arrays(content: RecordDict, name: str, nbytes: int) -> RecordDict:
    out = RecordDict(dict(content.items()))
    out[name] = ArrayRecord({"x": Array(np.zeros(nbytes // 2, np.float16))})
    return out


def segments(prefix: str, n: int, count: int = 1) -> dict[str, list[int]]:
    return {
        f"{prefix}-tasks": [0] * n,
        f"{prefix}-seeds": list(range(n)),
        f"{prefix}-counts": [count] * n,
    }


def plan_attacks(honest: RecordDict) -> dict[str, RecordDict]:
    """Every mutation of the honest round's download, by name (after round 2 was
    accepted); the node's max-download-bytes is 64 KiB."""
    h = HONEST_ROUND
    return {
        "replayed-round": with_plan(honest, round=h),
        "backward-round": with_plan(honest, round=h - 1),
        "huge-round": with_plan(honest, round=2**62),
        "float-round": with_plan(honest, round=float(h + 1)),
        "reply-weights": with_plan(honest, round=h + 1, reply="weights"),
        "huge-epochs": with_plan(honest, round=h + 1, epochs=10**9),
        "sequential-kd-epochs": with_plan(
            honest, round=h + 1, schedule="sequential", **{"kd-epochs": 10**9}
        ),
        # within max-items and max-epochs, but 2,000,000 KD steps
        "kd-steps": with_plan(
            honest,
            round=h + 1,
            schedule="sequential",
            **{"kd-epochs": 20, "kd-batch-size": 1, "proxy-counts": [100_000]},
        ),
        "proxy-segments": with_plan(honest, round=h + 1, **segments("proxy", BIG)),
        "huge-items": with_plan(honest, round=h + 1, **{"proxy-counts": [10**12]}),
        "memory-segments": with_plan(honest, round=h + 1, **segments("memory", BIG)),
        "teacher-count": with_plan(honest, round=h + 1, **{"teacher-count": 10**9}),
        "extra-download": with_arrays(with_plan(honest, round=h + 1), "extra", 128 * 1024),
        "huge-teacher": with_arrays(with_plan(honest, round=h + 1), TEACHER, 256 * 1024),
        "zero-batch": with_plan(honest, round=h + 1, **{"batch-size": 0}),
        "nan-lr": with_plan(honest, round=h + 1, lr=float("nan")),
    }


class Recorder:
    """Everything the server receives, one JSON line per message."""

    def __init__(self, path: Path, run_id: int) -> None:
        self.path, self.run_id = path, run_id

    def write(self, attack: str, kind: str, reply: Message | None) -> None:
        line: dict[str, Any] = {
            "run": self.run_id,
            "attack": attack,
            "kind": kind,
            "time": time.time(),
        }
        if reply is None:
            line["missing"] = True
        elif reply.has_error():
            line["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            line["reply"] = dump(reply.content)
            line["message_type"] = reply.metadata.message_type
        with open(self.path, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"bytes": base64.b64encode(v).decode()}
    if isinstance(v, list):
        return [_value(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return repr(v)
    return v


def dump(content: RecordDict) -> dict[str, Any]:
    """Every record of a reply, array bytes included (base64)."""
    out: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {
                k: {"dtype": a.dtype, "shape": list(a.shape), "stype": a.stype, **_value(a.data)}
                for k, a in rec.items()
            }
        else:
            out[name] = {k: _value(v) for k, v in rec.items()}
    return out


def ask(grid: Grid, node: int, kind: str, contents: dict[str, RecordDict]) -> dict[str, Any]:
    """Send every message at once and wait for each reply (polling faster than
    Grid.send_and_receive's 3 s): {name: reply or None}."""
    names = list(contents)
    msgs = [Message(contents[n], dst_node_id=node, message_type=kind) for n in names]
    ids = list(grid.push_messages(msgs))
    waiting, replies = dict(zip(ids, names, strict=True)), {}
    deadline = time.monotonic() + REPLY_TIMEOUT
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            replies[waiting.pop(reply.metadata.reply_to_message_id)] = reply
        time.sleep(0.5)
    return {n: replies.get(n) for n in names}


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    record = Recorder(out / "received.jsonl", context.run_id)
    attack = str(rc["attack"])
    deadline = time.monotonic() + 120
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise SystemExit("no node")
        time.sleep(0.2)
    node = nodes[0]
    honest = honest_download(str(rc["plan-overrides"]), out)

    def send(kind: str, contents: dict[str, RecordDict]) -> None:
        for name, reply in ask(grid, node, kind, contents).items():
            record.write(name, kind, reply)

    send(QUERY, {attack: RecordDict({CONFIG: ConfigRecord({"nonce": os.urandom(16)})})})
    if attack != "plans":  # a run-config attack: an otherwise honest round
        send(TRAIN, {attack: honest})
        return
    send(TRAIN, {"honest": with_plan(honest, round=HONEST_ROUND)})
    attacks = list(plan_attacks(honest).items())
    for start in range(0, len(attacks), PARALLEL):  # a few ClientApps at a time
        send(TRAIN, dict(attacks[start : start + PARALLEL]))
