"""The one round loop. Simulation, deployment and `fedkd-bench`'s compute bound all
run `run_rounds`; only the transport differs (`GridTransport`: Flower messages to
nodes; `DirectTransport`: the client function called in this process).

    begin_round     sample clients (privacy layer or strategy), fix the proxy items
    prepare_round   plan + payload per client (strategy.plan, .broadcast; mitigation)
    transport       downloads out, replies in
    conclude_round  tally the replies, the privacy layer, strategy.aggregate
    run_rounds      + evaluation, task-end hooks, recorder row, checkpoint
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedkd.checkpoint import save_checkpoint
from fedkd.comm.codecs import payload_bytes
from fedkd.protocol import CONFIG, TRAIN, RoundPlan
from fedkd.reply_checks import ReplyLimits
from fedkd.round import Round
from fedkd.server_state import ServerState
from fedkd.tally import Reply, ReplyTally
from strategies.base import UnsafeAggregate

log = logging.getLogger("fedkd.server")


def error_summary(reason: str) -> str:
    """The line of a client's error report that says what went wrong (Ray wraps the
    exception's message in a traceback)."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Message:" in ln:
            return ln.split("Message:", 1)[1].strip().rstrip("'>").strip()[:300]
    return (lines[-1] if lines else "no reason given")[:300]


class Transport(Protocol):
    def exchange(self, rnd: int, downloads: list[tuple[int, RecordDict]]) -> list[Reply]:
        """Send each partition its download; return the replies that came back."""
        ...


class GridTransport:
    """Flower messages over a Grid (simulation engine or SuperLink)."""

    def __init__(self, grid: Grid, partitions: dict[int, int], timeout: float | None) -> None:
        self.grid = grid
        self.partition_of = dict(partitions)  # node id -> partition id
        self.node_of = {pid: node for node, pid in partitions.items()}
        self.timeout = timeout

    def exchange(self, rnd: int, downloads: list[tuple[int, RecordDict]]) -> list[Reply]:
        messages = [
            Message(content, dst_node_id=self.node_of[pid], message_type=TRAIN, group_id=str(rnd))
            for pid, content in downloads
        ]
        replies = []
        for msg in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = msg.metadata.src_node_id
            pid = self.partition_of.get(node)
            if msg.has_error():
                replies.append(Reply(node, pid, error=error_summary(msg.error.reason)))
            else:
                replies.append(Reply(node, pid, msg.content))
        return replies


class DirectTransport:
    """The client function called in this process: no engine, no messages."""

    def __init__(self, client: Callable[[int, RecordDict], RecordDict]) -> None:
        self.client = client

    def exchange(self, rnd: int, downloads: list[tuple[int, RecordDict]]) -> list[Reply]:
        return [Reply(pid, pid, self.client(pid, content)) for pid, content in downloads]


def begin_round(state: ServerState, rnd: int) -> Round:
    """Sample the round's clients and fix its proxy items."""
    strategy, mitigation = state.strategy, state.mitigation
    sampled = (
        state.privacy.sample_clients(rnd, state.population, strategy.sample_clients)
        if strategy.uses_clients
        else []
    )
    r = Round(rnd, sampled, state.data)
    own = strategy.proxy_segments(rnd) if strategy.uses_proxy or mitigation.needs_proxy else []
    r.segments = own + mitigation.extra_segments(rnd)
    mitigation.begin_round(r)
    return r


def prepare_round(state: ServerState, rnd: int) -> tuple[Round, list[tuple[int, RecordDict]]]:
    """The round and each sampled client's download (its plan and payload)."""
    r = begin_round(state, rnd)
    if not r.sampled:
        return r, []
    strategy, mitigation = state.strategy, state.mitigation
    shared = strategy.broadcast(r)
    downloads = []
    records: dict[RoundPlan, ConfigRecord] = {}  # clients with equal plans share one
    for pid in r.sampled:
        plan = mitigation.adjust_plan(r, pid, strategy.plan(r, pid))
        payload = mitigation.client_payload(r, pid, plan, dict(shared))
        r.plans[pid] = plan
        r.bytes_down += sum(payload_bytes(rec) for rec in payload.values())
        if plan not in records:
            records[plan] = plan.to_record()
        downloads.append((pid, RecordDict({CONFIG: records[plan], **payload})))
    return r, downloads


def conclude_round(state: ServerState, r: Round, replies: list[Reply]) -> dict[str, Any]:
    """Tally the replies, aggregate the valid ones (in partition order), account for
    privacy; returns the round's statistics."""
    strategy = state.strategy
    limits = ReplyLimits(
        round=r.number,
        payload=strategy.reply_record,
        max_payload_bytes=strategy.payload_bytes_bound(r),
        num_tasks=state.data.num_tasks,
        max_examples=None,
    )
    tally = ReplyTally(
        r, strategy.check_payload, limits, state.declared_examples, state.participated
    )
    for reply in replies:
        tally.add(reply)
    valid = tally.close(len(replies))
    state.privacy.count_round(r, state.declared_examples)  # whatever became of the replies
    state.participated.update(reply.partition_id for reply in valid)
    need = state.cfg.faults.min_replies
    skipped = strategy.uses_clients and len(valid) < need
    extra: dict[str, Any] = {}
    if skipped:
        log.warning(
            "round %d: %d valid replies, fewer than faults.min_replies=%d; "
            "round skipped, the server state is unchanged",
            r.number,
            len(valid),
            need,
        )
    else:
        try:
            # under privacy.mode=client the strategy sees only the noised mean
            _, extra = strategy.aggregate(
                r, state.privacy.release(r, valid, strategy.check_payload)
            )
        except UnsafeAggregate as exc:
            skipped = True
            log.warning("round %d: %s; round skipped", r.number, exc)
    for reply in valid:
        state.privacy.record_reply(reply.partition_id, reply.metrics)
        if reply.info.get("ray-node"):
            state.ray_nodes.add(reply.info["ray-node"])
    state.evaluation.record_replies(valid)
    stats = {**tally.stats(skipped), **extra, **state.privacy.stats()}
    stats["student_task_accuracy"] = tally.student_task_accuracy()
    return {k: v for k, v in stats.items() if v is not None}


def run_rounds(
    state: ServerState,
    transport: Transport,
    recorder: Any,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Play rounds `state.round + 1 ..` to the configured number; each row goes to
    `recorder.log_round`, and with `out_dir` the state is checkpointed after each
    round. Returns the lifelong summary (accuracy matrices, metrics)."""
    cfg, strategy, evaluation = state.cfg, state.strategy, state.evaluation
    stream = state.data.stream
    if state.round == 0:
        evaluation.start(strategy.server_model)  # b_j: before any training
    for rnd in range(state.round + 1, cfg.rounds + 1):
        start = time.perf_counter()
        r, downloads = prepare_round(state, rnd)
        sent = time.perf_counter()
        replies = transport.exchange(rnd, downloads) if downloads else []
        received = time.perf_counter()
        task = stream.global_task(rnd)
        row: dict[str, Any] = {"round": rnd, "task": task, **conclude_round(state, r, replies)}
        students = row.pop("student_task_accuracy", None)
        row.update(evaluation.round_metrics(rnd, strategy.server_model, students, cfg.rounds))
        if stream.is_task_end(rnd, cfg.rounds) and task < state.data.num_tasks - 1:
            state.mitigation.on_task_end(task)
        row["wall_seconds"] = time.perf_counter() - start
        row["clients_seconds"] = received - sent  # from the first send to the last reply
        row["server_seconds"] = row["wall_seconds"] - row["clients_seconds"]
        recorder.log_round(row)
        state.round = rnd
        if out_dir is not None and cfg.output.checkpoint:
            save_checkpoint(out_dir, state.state_dict())
    return {**evaluation.final(), "ray_nodes": len(state.ray_nodes), **state.privacy.summary()}
