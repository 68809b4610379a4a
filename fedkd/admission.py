"""Admission to a federation: the partition handshake, one routine with one set of
rules for every node (a node per client, in simulation or deployment, and a cohort
node of the simulation, whose claim is a list of partitions), its replies read
defensively.

Every node gets a fresh nonce; a reply must be no error, hold a metrics record,
claim integer partition ids inside the run with integer shard sizes >= 1, and hold
the server's proxy digest; a node answers once, and every claimant of a partition
two nodes claim is left out. A declared shard size is capped (the server's own
partition size in simulation, run config `max-examples` in deployment): the tally
lets no later reply claim more (fedkd/tally.py), so the cap bounds a node's weight
in any example-weighted average.

With a `partition-keys` file, a claim must also be signed by the key bound to its
partition (fedkd/partition_keys.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedkd.errors import FedKDError
from fedkd.partition_keys import PartitionKeys, Refused
from fedkd.protocol import CONFIG, INFO, METRICS, QUERY

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger("fedkd.server")

NONCE_BYTES = 32


class FederationError(FedKDError):
    """The federation could not be formed (nodes missing, partitions inconsistent)."""


@dataclass(frozen=True)
class Handshake:
    """What the server asks before round 1 and the rules its replies meet: the same
    for every node, whether it claims one partition or (`many`, a cohort node) a list."""

    expected: int  # the run's partitions: ids 0..expected-1
    proxy_digest: str
    keys: PartitionKeys | None = None  # deployment: claims proven by the node's key
    run_id: int = 0
    many: bool = False  # a cohort node: "partition-ids" and a "num-examples" list
    max_examples: int | None = None  # deployment: the largest shard size believed
    known_sizes: Sequence[int] | None = None  # simulation: what each partition declares

    def query(self, node: int, nonce: bytes) -> Message:
        want = "partition-ids" if self.many else "partition-id"
        config = ConfigRecord({"want": want, "nonce": nonce})
        return Message(RecordDict({CONFIG: config}), dst_node_id=node, message_type=QUERY)

    def cap(self, pid: int) -> int | None:
        """The most examples partition `pid` may declare (None: no cap known)."""
        caps = [self.max_examples]
        if self.known_sizes is not None:
            caps.append(self.known_sizes[pid])
        return min((c for c in caps if c is not None), default=None)


def _text(value: Any) -> str:
    """A reply's value for a log line, cut short (a claim may be a huge list)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _partitions(metrics: Any, rules: Handshake) -> tuple[list[Any], list[Any]]:
    """The claimed partition ids and their declared sizes, unchecked, as lists."""
    if not rules.many:
        return [metrics.get("partition-id")], [metrics.get("num-examples")]
    pids, sizes = metrics.get("partition-ids"), metrics.get("num-examples")
    if not isinstance(pids, list) or not pids:
        raise Refused(f"malformed reply: partition-ids={_text(pids)} is not a list of ids")
    if sizes is None:
        return pids, [None] * len(pids)
    if not isinstance(sizes, list) or len(sizes) != len(pids):
        raise Refused(f"malformed reply: num-examples={_text(sizes)} is not a count per id")
    return pids, sizes


def _claim(metrics: Any, rules: Handshake) -> dict[int, int | None]:
    """{partition id: declared shard size (None: not declared)}, every rule checked."""
    claim: dict[int, int | None] = {}
    for pid, examples in zip(*_partitions(metrics, rules), strict=True):
        if type(pid) is not int:
            raise Refused(f"malformed reply: partition-id={_text(pid)} is not an integer")
        if not 0 <= pid < rules.expected:
            raise Refused(f"it claims partition {pid}, outside 0..{rules.expected - 1}")
        if examples is not None and (type(examples) is not int or examples < 1):
            raise Refused(f"malformed reply: num-examples={_text(examples)} is not a count")
        if pid in claim:
            raise Refused(f"malformed reply: it claims partition {pid} twice")
        claim[pid] = examples
    return claim


def _named(claim: dict[int, Any]) -> str:
    pids = list(claim)
    return f"partition {pids[0]}" if len(pids) == 1 else f"partitions {_text(pids)}"


def read_claim(reply: Message, rules: Handshake, nonce: bytes | None) -> dict[int, int | None]:
    """The partitions a handshake reply claims, with their declared shard sizes, once
    every rule passed; Refused (naming why) for an error reply, a reply to no query,
    a malformed one, another proxy set, a claim outside the run or, with keys, one
    its key does not prove (a signature proves one partition: a keyed node has one)."""
    if reply.has_error():
        from fedkd.round_loop import error_summary

        raise Refused(error_summary(reply.error.reason))
    content = reply.content
    if nonce is None:
        raise Refused("it answered a handshake it was not sent")
    if METRICS not in content.metric_records:
        raise Refused("malformed reply: no metrics record")
    claim = _claim(content.metric_records[METRICS], rules)
    info = content.config_records.get(INFO)
    theirs = None if info is None else info.get("proxy-digest")
    if not isinstance(theirs, str):
        raise Refused("malformed reply: no proxy digest")
    if theirs != rules.proxy_digest:
        raise Refused(
            f"it ({_named(claim)}) holds another proxy set (digest {theirs[:32]}, "
            f"the server's {rules.proxy_digest})"
        )
    if rules.keys is not None:
        for pid in claim:
            rules.keys.verify(info, nonce, rules.run_id, pid)
    return claim


def _read(
    reply: Message, rules: Handshake, nonce: bytes | None, answered: set[int]
) -> dict[int, int | None] | None:
    """read_claim, with a refusal (or any fault of the reply) logged: None."""
    node = reply.metadata.src_node_id
    try:
        if node in answered:
            raise Refused("it answered twice")
        return read_claim(reply, rules, nonce)
    except Refused as exc:
        log.warning("node %s failed the handshake and is left out: %s", node, exc)
    except Exception as exc:  # any other fault in a reply: that node is out
        log.warning(
            "node %s failed the handshake and is left out: malformed reply (%s: %s)",
            node,
            type(exc).__name__,
            str(exc)[:200],
        )
    return None


def _uncontested(claims: dict[int, dict[int, int | None]], rules: Handshake) -> list[int]:
    """The nodes none of whose partitions another node claims too."""
    claimants: dict[int, list[int]] = {}
    for node, claim in claims.items():
        for pid in claim:
            claimants.setdefault(pid, []).append(node)
    out = set(claims)
    hint = ""
    if rules.keys is None and not rules.many:  # cohorts are simulated: no keys there
        hint = " (bind partitions to node keys with run config partition-keys)"
    for pid, nodes in sorted(claimants.items()):
        if len(nodes) > 1:
            log.warning(
                "nodes %s all claim partition %d; none of them is admitted%s",
                sorted(nodes),
                pid,
                hint,
            )
            out -= set(nodes)
    return sorted(out)


def _capped(node: int, claim: dict[int, int | None], rules: Handshake) -> dict[int, int]:
    """The shard sizes kept for the tally: each declared size, at most its cap (the
    cap itself where none was declared); a node declaring more is warned of once."""
    kept: dict[int, int] = {}
    over: list[str] = []
    for pid, declared in claim.items():
        cap = rules.cap(pid)
        if declared is not None and cap is not None and declared > cap:
            over.append(f"partition {pid}: {declared} > {cap}")
        known = [n for n in (declared, cap) if n is not None]
        if known:
            kept[pid] = min(known)
    if over:
        log.warning(
            "node %s declares more examples than its cap (%s%s); its replies count at most that",
            node,
            "; ".join(over[:3]),
            "; ..." if len(over) > 3 else "",
        )
    return kept


def admit(
    grid: Grid,
    nodes: list[int],
    timeout: float,
    rules: Handshake,
    shard_sizes: dict[int, int] | None = None,
) -> dict[int, list[int]]:
    """The handshake: {node id: the partitions it serves} of the nodes admitted, and
    each admitted partition's capped shard size into `shard_sizes` (when given). A
    node that fails a rule is left out with a warning, and so is every claimant of a
    contested partition: no reply can stop the federation from forming."""
    nonces = {n: os.urandom(NONCE_BYTES) for n in nodes}  # fresh: a signature cannot be replayed
    messages = [rules.query(n, nonces[n]) for n in nodes]
    claims: dict[int, dict[int, int | None]] = {}
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        claim = _read(reply, rules, nonces.get(node), answered)
        answered.add(node)
        if claim is not None:
            claims[node] = claim
    admitted = {node: list(claims[node]) for node in _uncontested(claims, rules)}
    for node in admitted:
        sizes = _capped(node, claims[node], rules)
        if shard_sizes is not None:
            shard_sizes.update(sizes)
    served = {pid for pids in admitted.values() for pid in pids}
    missing = sorted(set(range(rules.expected)) - served)
    if missing:
        log.warning(
            "no node holds partition(s) %s; sampling uses the %d admitted",
            missing[:10],
            len(served),
        )
    if not admitted:
        raise FederationError("no node passed the partition handshake")
    return admitted
