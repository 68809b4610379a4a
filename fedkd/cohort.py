"""Cohort execution (simulation only): a simulated node serves a group of partitions,
and each round the server sends it one message holding the downloads of all its
sampled clients, instead of one Flower message and one ClientApp call per client.

Why: a client's fixed cost in Flower's engine (a message each way, a ClientApp call,
Ray's scheduling) is tens of milliseconds, as much as a small client's training, so
a round of 1,000 tiny clients cost several times a round of 10 big ones on the same
data. With cohorts the engine's cost is per node, not per client.

What stays per client: every client has its own plan, payload and reply inside the
node's message; the server unpacks the replies and the tally validates, counts and
byte-accounts each one exactly as with a node per client, and a client's error fails
that client only. Each client's work is the same function with the same seeds, so
both paths give the same numbers. Deployment never uses cohorts: on a device, one
node is one client.

    node k of K serves partitions k, k + K, k + 2K, ... (below num_clients)
    down  "P/config": partition P's plan; "P/NAME": its payload record NAME, or, for a
          record already packed for another client (the broadcast), "P/refs" names
          the key it travels under: a shared record travels once per node
    up    "P/NAME": partition P's reply records, or "P/error": why it failed
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedkd.admission import Handshake, admit
from fedkd.config.checks import require
from fedkd.partition_keys import PartitionKeys
from fedkd.protocol import CONFIG, TRAIN, InvalidReply
from fedkd.tally import Reply

log = logging.getLogger("fedkd.server")

PER_CLIENT, COHORT, AUTO = "per_client", "cohort", "auto"
NODES_PER_SLOT = 4  # cohort nodes per client slot: small cohorts balance the slots
REFS, ERROR = "refs", "error"


# ---------------------------------------------------------------------------- config
def resolve_execution(plain: dict[str, Any]) -> str:
    """Fix `simulation.execution` and `simulation.cohort_nodes` in the plain config
    (fedkd-sim only) and return the mode. `auto` picks cohorts when there are at least
    twice as many clients as cohort nodes, unless stragglers are injected (a straggler
    would hold back its whole cohort: their timing is per client)."""
    sim, faults = plain["simulation"], plain["faults"]
    num_clients = int(plain["num_clients"])
    nodes = sim.get("cohort_nodes")
    if nodes is None:
        slots = max(1, (os.cpu_count() or 1) // int(sim["num_cpus"]))
        nodes = NODES_PER_SLOT * slots
    nodes = min(int(nodes), num_clients)
    mode = sim.get("execution", AUTO)
    stragglers = float(faults["straggler_prob"]) > 0
    require(
        not (mode == COHORT and stragglers),
        "simulation.execution",
        mode,
        "per_client or auto with faults.straggler_prob > 0 (a straggler's delay is per client)",
    )
    if mode == AUTO:
        many = num_clients >= 2 * nodes
        mode = COHORT if many and not stragglers else PER_CLIENT
        if many and stragglers:
            log.warning("execution: per client, since faults.straggler_prob > 0")
    sim["execution"], sim["cohort_nodes"] = mode, nodes if mode == COHORT else None
    if mode == COHORT:
        log.info("execution: cohorts, %d clients on %d simulated nodes", num_clients, nodes)
    return mode


def node_partitions(node: int, num_nodes: int, num_clients: int) -> list[int]:
    """The partitions cohort node `node` of `num_nodes` serves."""
    return list(range(node, num_clients, num_nodes))


# ---------------------------------------------------------------------------- packing
def pack_downloads(downloads: list[tuple[int, RecordDict]]) -> RecordDict:
    """One node's message content from its clients' downloads."""
    packed = RecordDict()
    placed: dict[int, str] = {}  # id(record) -> the key it travels under
    for pid, content in downloads:
        refs: dict[str, str] = {}
        for name, record in content.items():
            key = placed.get(id(record))
            if key is None:
                key = placed[id(record)] = f"{pid}/{name}"
                packed[key] = record
            else:
                refs[name] = key
        if refs:
            packed[f"{pid}/{REFS}"] = ConfigRecord(refs)
    return packed


def _split_key(key: str) -> tuple[int, str]:
    pid, sep, name = key.partition("/")
    if not sep or not pid.isdigit() or not name:
        raise InvalidReply(f"cohort record {key[:60]!r} is not 'PARTITION/NAME'")
    return int(pid), name


def unpack_downloads(content: RecordDict) -> list[tuple[int, RecordDict]]:
    """The clients' downloads in a node's message, in the order they were packed."""
    own: dict[int, RecordDict] = {}
    refs: dict[int, ConfigRecord] = {}
    for key, record in content.items():
        pid, name = _split_key(key)
        if name == REFS:
            refs[pid] = record
        else:
            own.setdefault(pid, RecordDict())[name] = record
    for pid, names in refs.items():
        for name, key in names.items():
            own.setdefault(pid, RecordDict())[name] = content[str(key)]
    missing = [pid for pid, c in own.items() if CONFIG not in c]
    if missing:
        raise ValueError(f"cohort message without a plan for partition(s) {missing[:5]}")
    return list(own.items())


def pack_replies(results: list[tuple[int, RecordDict | str]]) -> RecordDict:
    """A node's reply: each client's records, or its error message."""
    packed = RecordDict()
    for pid, result in results:
        if isinstance(result, str):
            packed[f"{pid}/{ERROR}"] = ConfigRecord({ERROR: result[:1000]})
            continue
        for name, record in result.items():
            packed[f"{pid}/{name}"] = record
    return packed


def unpack_replies(content: RecordDict, sent: list[int]) -> dict[int, RecordDict | str]:
    """{partition: its reply records or its error} for the partitions in `sent` that
    answered. Records of partitions this node was not sent are dropped (logged):
    a node speaks only for its own clients."""
    out: dict[int, Any] = {}
    wanted, strays = set(sent), set()
    for key, record in content.items():
        try:
            pid, name = _split_key(key)
        except InvalidReply:
            strays.add(key[:60])
            continue
        if pid not in wanted:
            strays.add(key[:60])
            continue
        if name == ERROR:
            out[pid] = str(record.get(ERROR, "no reason given"))[:1000]
        elif not isinstance(out.get(pid), str):
            out.setdefault(pid, RecordDict())[name] = record
    if strays:
        log.warning("cohort reply: dropped records for clients not sent: %s", sorted(strays)[:5])
    return out


# ---------------------------------------------------------------------------- server side
class CohortTransport:
    """The round's downloads grouped by node, one Flower message per node; the
    replies unpacked per client (fedkd.round_loop.Transport)."""

    def __init__(self, grid: Grid, cohorts: dict[int, list[int]], timeout: float | None) -> None:
        self.grid = grid
        self.node_of = {pid: node for node, pids in cohorts.items() for pid in pids}
        self.timeout = timeout

    def exchange(self, rnd: int, downloads: list[tuple[int, RecordDict]]) -> list[Reply]:
        from fedkd.round_loop import error_summary

        groups: dict[int, list[tuple[int, RecordDict]]] = {}
        for pid, content in downloads:
            groups.setdefault(self.node_of[pid], []).append((pid, content))
        sent = {node: [pid for pid, _ in group] for node, group in groups.items()}
        messages = [
            Message(pack_downloads(group), dst_node_id=node, message_type=TRAIN, group_id=str(rnd))
            for node, group in groups.items()
        ]
        replies: list[Reply] = []
        for msg in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = msg.metadata.src_node_id
            pids = sent.pop(node, [])
            if msg.has_error():
                why = error_summary(msg.error.reason)
                replies += [Reply(node, pid, error=why) for pid in pids]
                continue
            try:
                answers = unpack_replies(msg.content, pids)
            except Exception as exc:  # a node's reply is untrusted too
                answers = {pid: f"malformed cohort reply ({type(exc).__name__})" for pid in pids}
            for pid in pids:
                answer = answers.get(pid)
                if isinstance(answer, str):
                    replies.append(Reply(node, pid, error=answer))
                elif answer is not None:
                    replies.append(Reply(node, pid, answer))
        return replies


def discover_cohorts(
    grid: Grid,
    nodes: list[int],
    num_clients: int,
    timeout: float,
    proxy_digest: str,
    shard_sizes: dict[int, int],
    max_examples: int | None = None,
    known_sizes: Sequence[int] | None = None,
    keys: PartitionKeys | None = None,
    run_id: int = 0,
) -> dict[int, list[int]]:
    """The handshake of cohort nodes: {node: the partitions it serves}, each admitted
    partition's capped shard size into `shard_sizes`. The rules, and who is left
    out, are those of a node per client (fedkd.admission.admit): a cohort node's
    claim is just a list of partitions. With `keys` (a run that binds partitions to
    keys) every partition must be proven, which a cohort node cannot: it fails closed."""
    rules = Handshake(num_clients, proxy_digest, keys, run_id, True, max_examples, known_sizes)
    return admit(grid, nodes, timeout, rules, shard_sizes)
