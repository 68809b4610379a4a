"""Cohort execution (fedkd/cohort.py): packing, the node handlers, the transport."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedkd.client import build_client_app
from fedkd.cohort import (
    CohortTransport,
    discover_cohorts,
    node_partitions,
    pack_downloads,
    pack_replies,
    resolve_execution,
    unpack_downloads,
    unpack_replies,
)
from fedkd.errors import ConfigError
from fedkd.protocol import CONFIG, INFO, KNOWLEDGE, LOGITS, METRICS, TRAIN, WEIGHTS
from fedkd.server import FederationError
from tests.test_client import plan


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32))})


def test_node_partitions_cover_every_partition_once():
    served = [p for node in range(7) for p in node_partitions(node, 7, 100)]
    assert sorted(served) == list(range(100))
    assert node_partitions(2, 7, 100)[:3] == [2, 9, 16]


def test_downloads_round_trip_and_a_shared_record_travels_once():
    shared = arrays(1.0)
    downloads = [
        (3, RecordDict({CONFIG: ConfigRecord({"r": 3}), WEIGHTS: shared})),
        (5, RecordDict({CONFIG: ConfigRecord({"r": 5}), WEIGHTS: shared})),
        (9, RecordDict({CONFIG: ConfigRecord({"r": 9}), WEIGHTS: arrays(2.0)})),
    ]
    packed = pack_downloads(downloads)
    weights = [k for k, v in packed.items() if isinstance(v, ArrayRecord)]
    assert weights == ["3/weights", "9/weights"]  # partition 5 names 3's copy
    back = unpack_downloads(packed)
    assert [pid for pid, _ in back] == [3, 5, 9]
    for (_, want), (_, got) in zip(downloads, back, strict=True):
        assert dict(got[CONFIG]) == dict(want[CONFIG])
        assert np.array_equal(got[WEIGHTS]["w"].numpy(), want[WEIGHTS]["w"].numpy())


def test_a_download_without_a_plan_is_refused():
    with pytest.raises(ValueError, match="without a plan"):
        unpack_downloads(RecordDict({"4/weights": arrays(1.0)}))


def test_replies_unpack_per_client_and_strays_are_dropped():
    ok = RecordDict({METRICS: MetricRecord({"round": 1}), KNOWLEDGE: arrays(0.5)})
    packed = pack_replies([(1, ok), (4, "ValueError: boom")])
    packed["7/metrics"] = MetricRecord({"round": 1})  # a partition this node was not sent
    packed["not-a-client"] = MetricRecord({"x": 1})
    out = unpack_replies(packed, sent=[1, 4, 6])
    assert set(out) == {1, 4}  # 6 never answered: late, not invented
    assert out[4] == "ValueError: boom"
    assert set(out[1].keys()) == {METRICS, KNOWLEDGE}


def plain(num_clients=100, cpus=1, execution="auto", nodes=None, stragglers=0.0):
    return {
        "num_clients": num_clients,
        "simulation": {"num_cpus": cpus, "execution": execution, "cohort_nodes": nodes},
        "faults": {"straggler_prob": stragglers},
    }


def test_auto_execution_takes_cohorts_only_when_clients_outnumber_nodes(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = plain(100)
    assert resolve_execution(cfg) == "cohort" and cfg["simulation"]["cohort_nodes"] == 8
    cfg = plain(10)
    assert resolve_execution(cfg) == "per_client" and cfg["simulation"]["cohort_nodes"] is None
    assert resolve_execution(plain(100, stragglers=0.1)) == "per_client"
    cfg = plain(3, execution="cohort", nodes=5)
    assert resolve_execution(cfg) == "cohort" and cfg["simulation"]["cohort_nodes"] == 3
    with pytest.raises(ConfigError, match="straggler"):
        resolve_execution(plain(100, execution="cohort", stragglers=0.1))


def cohort_context(node, nodes):
    return Context(
        run_id=1,
        node_id=100 + node,
        node_config={"partition-id": node, "num-partitions": nodes},
        state=RecordDict(),
        run_config={},
    )


def test_a_cohort_node_serves_its_clients_as_the_per_client_path_does(plain_cfg):
    cfg = plain_cfg("num_clients=5", "simulation.execution=cohort", "simulation.cohort_nodes=2")
    assert cfg["simulation"]["execution"] == "cohort"
    app = build_client_app(cfg)
    query = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=101, message_type="query")
    claim = app(query, cohort_context(1, 2)).content
    assert claim.metric_records[METRICS]["partition-ids"] == [1, 3]

    p = plan(cfg, count=40)
    downloads = [(pid, RecordDict({CONFIG: p.to_record()})) for pid in (1, 3)]
    downloads.append((0, RecordDict({CONFIG: p.to_record()})))  # not this node's
    msg = Message(pack_downloads(downloads), dst_node_id=101, message_type=TRAIN)
    replies = unpack_replies(app(msg, cohort_context(1, 2)).content, [0, 1, 3])
    assert "not served by this node" in replies[0]
    cohort_logits = {pid: replies[pid][KNOWLEDGE][LOGITS].numpy() for pid in (1, 3)}

    single = plain_cfg("num_clients=5", "simulation.execution=per_client")
    single_app = build_client_app(single)
    for pid in (1, 3):
        ctx = Context(
            run_id=1,
            node_id=10 + pid,
            node_config={"partition-id": pid, "num-partitions": 5},
            state=RecordDict(),
            run_config={},
        )
        content = RecordDict({CONFIG: p.to_record()})
        reply = single_app(Message(content, dst_node_id=10 + pid, message_type=TRAIN), ctx)
        assert np.array_equal(reply.content[KNOWLEDGE][LOGITS].numpy(), cohort_logits[pid])


class FakeGrid:
    """Answers each message with what `answer(node, content)` returns."""

    def __init__(self, answer):
        self.answer = answer
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        self.sent.extend(messages)
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            content = self.answer(node, m.content)
            out.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node),
                    content=content,
                    has_error=lambda: False,
                )
            )
        return out


def test_the_transport_sends_one_message_per_node_and_returns_replies_per_client():
    def answer(node, content):
        pids = [pid for pid, _ in unpack_downloads(content)]
        return pack_replies(
            [(p, RecordDict({METRICS: MetricRecord({"p": p})})) for p in pids if p != 4]
        )

    grid = FakeGrid(answer)
    transport = CohortTransport(grid, {11: [0, 2, 4], 12: [1, 3]}, timeout=None)
    downloads = [(p, RecordDict({CONFIG: ConfigRecord({"p": p})})) for p in (0, 1, 2, 4)]
    replies = transport.exchange(1, downloads)
    assert len(grid.sent) == 2
    got = {r.partition_id: (r.node, r.content[METRICS]["p"]) for r in replies}
    assert got == {0: (11, 0), 1: (12, 1), 2: (11, 2)}  # 4 did not answer


def test_the_cohort_handshake_leaves_out_bad_claims(caplog):
    claims = {
        1: ([0, 2], [10, 20], "d"),
        2: ([1, 2], [10, 20], "d"),  # claims 2 again: both claimants are out
        3: ([3], [5], "other"),  # another proxy set
        4: ([9], [5], "d"),  # outside 0..4
        5: ([4], [7], "d"),
        6: ([3, 3], [1, 1], "d"),  # one partition twice
    }

    def answer(node, content):
        pids, sizes, digest = claims[node]
        return RecordDict(
            {
                METRICS: MetricRecord({"partition-ids": pids, "num-examples": sizes}),
                INFO: ConfigRecord({"proxy-digest": digest}),
            }
        )

    sizes: dict[int, int] = {}
    cohorts = discover_cohorts(FakeGrid(answer), list(claims), 5, 1.0, "d", sizes)
    # on the old main the first claimant of partition 2 kept it: {1: [0, 2], 5: [4]}
    assert cohorts == {5: [4]}
    assert sizes == {4: 7}
    assert "nodes [1, 2] all claim partition 2; none of them is admitted" in caplog.text
    assert (
        "node 6 failed the handshake and is left out: malformed reply: it claims partition 3 twice"
        in caplog.text
    )


def claiming(claims: dict[int, tuple[list[int], list[int]]]):
    """A cohort grid's answer: each node claims its partitions with their sizes."""

    def answer(node, content):
        pids, sizes = claims[node]
        return RecordDict(
            {
                METRICS: MetricRecord({"partition-ids": pids, "num-examples": sizes}),
                INFO: ConfigRecord({"proxy-digest": "d"}),
            }
        )

    return answer


def test_every_cohort_node_gets_a_fresh_nonce_and_a_stranger_is_refused(caplog):
    # on the old main the cohort query held no nonce and any reply was read
    from fedkd.admission import NONCE_BYTES

    grid = FakeGrid(claiming({1: ([0], [5]), 2: ([1], [5])}))
    assert discover_cohorts(grid, [1, 2], 2, 1.0, "d", {}) == {1: [0], 2: [1]}
    nonces = [m.content.config_records[CONFIG]["nonce"] for m in grid.sent]
    assert len(set(nonces)) == 2 and all(len(n) == NONCE_BYTES for n in nonces)
    caplog.clear()
    with pytest.raises(FederationError):  # node 3 answers a query sent to node 1
        discover_cohorts(Misrouted(claiming({1: ([0], [5])})), [1], 2, 1.0, "d", {})
    assert (
        "node 3 failed the handshake and is left out: it answered a handshake it was not sent"
        in caplog.text
    )


class Misrouted(FakeGrid):
    """Every reply claims to come from node 3."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            reply.metadata.src_node_id = 3
        return replies


def test_a_cohort_nodes_declared_sizes_are_capped_at_the_known_partition_sizes(caplog):
    # on the old main: no cap, the tally believed 2**62 examples for partition 2
    grid = FakeGrid(claiming({1: ([0, 2], [10, 2**62]), 2: ([1], [3])}))
    sizes: dict[int, int] = {}
    cohorts = discover_cohorts(grid, [1, 2], 3, 1.0, "d", sizes, known_sizes=[10, 4, 20])
    assert cohorts == {1: [0, 2], 2: [1]}
    assert sizes == {0: 10, 1: 3, 2: 20}
    (line,) = [r.getMessage() for r in caplog.records if "more examples" in r.getMessage()]
    assert line.startswith("node 1 declares more examples than its cap (partition 2: ")


def test_a_cohort_handshake_with_partition_keys_fails_closed(caplog):
    # on the old main the cohort handshake ignored the key binding altogether
    from fedkd.partition_keys import PartitionKeys

    grid = FakeGrid(claiming({1: ([0], [5])}))
    with pytest.raises(FederationError, match="no node passed the partition handshake"):
        discover_cohorts(grid, [1], 1, 1.0, "d", {}, keys=PartitionKeys({}), run_id=7)
    assert "node 1 failed the handshake and is left out: no signed claim" in caplog.text
