"""The ServerApp's set-up: waiting for nodes, the partition handshake, GPU sharing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedkd import resources
from fedkd.protocol import INFO, METRICS
from fedkd.server import FederationError, discover_partitions, wait_for_nodes

DIGEST = "0123456789abcdef"


class FakeGrid:
    """Nodes appear one per get_node_ids() call; queries answer with partition ids
    (or with what `craft(node, query)` returns for a node it knows)."""

    def __init__(
        self,
        partitions: dict[int, int],
        appear_per_call: int = 1,
        broken: set[int] = frozenset(),
        other_proxy: set[int] = frozenset(),
        craft: Callable[[int, Message], Any] | None = None,
    ):
        self.partitions = partitions
        self.other_proxy = other_proxy
        self.visible = 0
        self.step = appear_per_call
        self.broken = broken
        self.craft = craft

    def get_node_ids(self):
        self.visible = min(len(self.partitions), self.visible + self.step)
        return list(self.partitions)[: self.visible]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.broken:
                replies.append(Message(Error(code=0, reason="boom"), reply_to=msg))
                continue
            crafted = self.craft(node, msg) if self.craft else None
            if crafted is not None:
                replies.append(crafted)
                continue
            digest = "another" if node in self.other_proxy else DIGEST
            content = RecordDict(
                {
                    METRICS: MetricRecord({"partition-id": self.partitions[node]}),
                    INFO: ConfigRecord({"proxy-digest": digest}),
                }
            )
            reply = Message(content, reply_to=msg)
            replies.append(reply)
        return replies


def test_round_one_waits_until_every_node_registered():
    grid = FakeGrid({11: 0, 12: 1, 13: 2})
    assert wait_for_nodes(grid, 3, timeout=10) == [11, 12, 13]
    assert grid.visible == 3


def test_missing_nodes_time_out_with_a_clear_error():
    grid = FakeGrid({11: 0}, appear_per_call=1)
    with pytest.raises(FederationError, match="only 1 of num_clients=3 nodes registered"):
        wait_for_nodes(grid, 3, timeout=0.3)


def handshake(grid: FakeGrid) -> dict[int, int]:
    """The partition handshake with every node of `grid`, which holds the server's
    proxy set (DIGEST) unless `other_proxy` says otherwise."""
    nodes = list(grid.partitions)
    return discover_partitions(grid, nodes, len(nodes), timeout=5, proxy_digest=DIGEST)


def test_handshake_maps_nodes_to_partitions():
    assert handshake(FakeGrid({11: 2, 12: 0, 13: 1})) == {11: 2, 12: 0, 13: 1}


def test_handshake_tolerates_a_silent_node(caplog):
    assert handshake(FakeGrid({11: 0, 12: 1, 13: 2}, broken={12})) == {11: 0, 13: 2}
    assert "failed the handshake and is left out: boom" in caplog.text


def test_a_contested_partition_leaves_every_claimant_out_and_the_run_goes_on(caplog):
    # on the old main: FederationError "two nodes claim partition 0", the run aborted
    grid = FakeGrid({11: 0, 12: 0, 13: 1, 14: 0})
    assert handshake(grid) == {13: 1}
    assert "nodes [11, 12, 14] all claim partition 0; none of them is admitted" in caplog.text
    with pytest.raises(FederationError, match="no node passed the partition handshake"):
        handshake(FakeGrid({11: 0, 12: 0}))  # nobody left: the federation cannot form


def test_handshake_leaves_out_a_node_with_another_proxy_set(caplog):
    assert handshake(FakeGrid({11: 0, 12: 1, 13: 2}, other_proxy={13})) == {11: 0, 12: 1}
    assert "holds another proxy set" in caplog.text


def test_num_gpus_auto(monkeypatch):
    monkeypatch.setattr(resources, "visible_gpus", lambda: 0)
    assert resources.resolve_num_gpus("auto", 1) == 0.0
    assert resources.client_device(0.0) == "cpu"
    monkeypatch.setattr(resources, "visible_gpus", lambda: 2)
    monkeypatch.setattr(resources.os, "cpu_count", lambda: 16)
    assert resources.resolve_num_gpus("auto", 1) == pytest.approx(2 / 16)  # 8 clients per GPU
    assert resources.resolve_num_gpus("auto", 8) == pytest.approx(1.0)  # 2 slots, 2 GPUs
    assert resources.resolve_num_gpus(0.25, 1) == 0.25
