"""The simulation-engine fix delivers like Flower does: each pending instruction once,
at most one per node per pass, only to the engine's nodes, after the state's own
expiry check. Checked on a fake state and on Flower's real in-memory LinkState; when
Flower's internals have moved, the dispatch thread falls back to Flower's own function."""

import contextlib
import inspect
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from queue import Empty, Queue
from types import SimpleNamespace

import pytest

from fedkd import flower_patches


class FakeState:
    """The parts of Flower's InMemoryLinkState that `deliver_pending` touches."""

    def __init__(self, messages: dict[str, int], expired: set[str] = frozenset()) -> None:
        self.lock = threading.Lock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for mid, node in messages.items()
        }
        self.expired = set(expired)
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.append(set(ids))
        for mid in self.expired & ids:
            del self.message_ins_store[mid]


def ids(msgs) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in msgs)


def test_one_per_node_per_pass_and_never_twice():
    state = FakeState({"a": 1, "b": 1, "c": 2, "d": 3})
    first = flower_patches.deliver_pending(state, {1, 2, 3})
    assert ids(first) == [1, 2, 3]
    second = flower_patches.deliver_pending(state, {1, 2, 3})
    assert ids(second) == [1]  # node 1's second instruction, next pass
    assert flower_patches.deliver_pending(state, {1, 2, 3}) == []
    assert all(m.metadata.delivered_at for m in state.message_ins_store.values())


def test_other_nodes_and_expired_messages_are_left_alone():
    state = FakeState({"a": 1, "b": 2, "x": 99}, expired={"b"})
    out = flower_patches.deliver_pending(state, {1, 2})
    assert ids(out) == [1]
    assert state.checked == [{"a", "b"}]  # the state's own expiry check ran on them
    assert state.message_ins_store["x"].metadata.delivered_at == ""


def test_configure_installs_and_restores():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    try:
        assert flower_patches.configure(True) is True
        assert vce_api.add_messages_to_queue is flower_patches._add_messages_to_queue
        assert flower_patches.configure(False) is False
        assert vce_api.add_messages_to_queue is original
    finally:
        vce_api.add_messages_to_queue = original


def test_unsupported_flower_version_is_left_alone(monkeypatch):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(flwr, "__version__", "9.0.0")
    assert flower_patches.configure(True) is False
    assert vce_api.add_messages_to_queue is original


def test_replacement_keeps_flowers_signature():
    original = inspect.signature(flower_patches._original())
    assert list(inspect.signature(flower_patches._add_messages_to_queue).parameters) == list(
        original.parameters
    )


# --- against Flower's real in-memory LinkState -------------------------------------


@dataclass
class Link:
    """A real InMemoryLinkState with one run, the engine's nodes and one node outside."""

    state: object
    grid: object
    mapping: dict[int, int]  # the engine's nodes -> partition, as vce_api builds it
    outsider: int  # registered with the state, not in the engine's mapping

    def push(self, per_node: int, nodes=None) -> dict[str, int]:
        """Store instructions the way the simulation's ServerApp does; id -> node."""
        from flwr.app import Message, RecordDict

        nodes = list(self.mapping) if nodes is None else nodes
        msgs = [
            Message(RecordDict(), dst_node_id=n, message_type="train")
            for _ in range(per_node)
            for n in nodes
        ]
        stored = list(self.grid.push_messages(msgs))
        assert len(stored) == len(msgs)  # the state accepted all of them
        return {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}


@pytest.fixture
def link(monkeypatch) -> Link:
    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_FLWR_AID, SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    # What flwr.simulation.run_simulation builds for the engine (flwr 1.41).
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
    )
    assert run_id
    run = state.get_run_info(run_ids=[run_id])[0]
    nodes = []
    for _ in range(4):  # as vce_api._register_nodes does
        node = state.create_node(NOOP_FLWR_AID, "none", secrets.token_bytes(32), 1.0)
        assert state.acknowledge_node_heartbeat(node, HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    # Message() takes run and source from the task identity the ServerApp runs under.
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", run.primary_task_id)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return Link(state, grid, {n: i for i, n in enumerate(nodes[:3])}, nodes[3])


def drain(queue: Queue, n: int, timeout: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        with contextlib.suppress(Empty):
            got.append(queue.get(timeout=0.05))
    return got


def run_dispatch(link: Link, queue: Queue, expected: int) -> list:
    """Run the patched dispatch thread until `expected` messages arrive, then stop it."""
    escaped = []
    f_stop = threading.Event()
    thread = threading.Thread(
        target=flower_patches._add_messages_to_queue,
        args=(link.state, queue, link.mapping, f_stop),
    )
    previous, threading.excepthook = threading.excepthook, escaped.append
    try:
        thread.start()
        got = drain(queue, expected)
        f_stop.set()
        thread.join(timeout=10)
    finally:
        threading.excepthook = previous
    assert not thread.is_alive()
    assert escaped == []
    while not queue.empty():  # nothing more after the stop either
        got.append(queue.get_nowait())
    return got


def test_real_state_one_per_node_per_pass_each_once(link):
    engine = set(link.mapping)
    pushed = link.push(per_node=2)
    (outsider_id,) = link.push(per_node=1, nodes=[link.outsider])
    store = link.state.message_ins_store

    passes = [flower_patches.deliver_pending(link.state, engine) for _ in range(3)]
    assert [ids(p) for p in passes] == [sorted(engine), sorted(engine), []]
    delivered = [m.metadata.message_id for p in passes for m in p]
    assert sorted(delivered) == sorted(pushed)  # every one, exactly once
    assert all(store[mid].metadata.delivered_at != "" for mid in pushed)
    assert store[outsider_id].metadata.delivered_at == ""
    # Flower's own reading of the state agrees: nothing left for the engine's nodes,
    # the outsider's instruction still waiting.
    assert all(link.state.get_message_ins(node_id=n, limit=None) == [] for n in engine)
    assert [m.metadata.message_id for m in link.state.get_message_ins(link.outsider, 1)] == [
        outsider_id
    ]


def test_real_state_drops_expired_by_its_own_check(link):
    node = next(iter(link.mapping))
    (mid,) = link.push(per_node=1, nodes=[node])
    msg = link.state.message_ins_store[mid]
    msg.metadata.created_at -= msg.metadata.ttl + 1
    assert flower_patches.deliver_pending(link.state, set(link.mapping)) == []
    assert mid not in link.state.message_ins_store


def test_real_state_dispatch_thread_delivers_each_once(link, monkeypatch, caplog):
    fallback = []
    monkeypatch.setitem(flower_patches._ORIGINAL, "add_messages_to_queue", fallback.append)
    caplog.set_level(logging.WARNING, logger="fedkd")
    pushed = link.push(per_node=3)
    (outsider_id,) = link.push(per_node=1, nodes=[link.outsider])

    got = run_dispatch(link, Queue(), expected=len(pushed))
    assert sorted(m.metadata.message_id for m in got) == sorted(pushed)
    assert link.state.message_ins_store[outsider_id].metadata.delivered_at == ""
    assert fallback == [] and caplog.records == []  # fedkd's own path did it all


def test_missing_private_attribute_falls_back_once(link, monkeypatch, caplog):
    calls = []
    monkeypatch.setitem(
        flower_patches._ORIGINAL, "add_messages_to_queue", lambda *a: calls.append(a)
    )
    caplog.set_level(logging.WARNING, logger="fedkd")
    # A Flower release that renamed the store: the real state, without the attribute.
    link.state._moved = link.state.__dict__.pop("message_ins_store")
    queue, f_stop, escaped = Queue(), threading.Event(), []
    args = (link.state, queue, link.mapping, f_stop)
    thread = threading.Thread(target=flower_patches._add_messages_to_queue, args=args)
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    thread.start()
    thread.join(timeout=10)

    assert not thread.is_alive() and escaped == []
    assert len(calls) == 1 and all(a is b for a, b in zip(calls[0], args, strict=True))
    warnings = [r for r in caplog.records if r.name == "fedkd"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "AttributeError" in warnings[0].getMessage()


def test_fallback_to_flower_mid_run_repeats_nothing(link, monkeypatch, caplog):
    real, passes = flower_patches.deliver_pending, []

    def breaks_after_one_pass(state, nodes):
        passes.append(1)
        if len(passes) > 1:
            raise KeyError("moved")
        return real(state, nodes)

    monkeypatch.setattr(flower_patches, "deliver_pending", breaks_after_one_pass)
    caplog.set_level(logging.WARNING, logger="fedkd")
    pushed = link.push(per_node=2)

    # first pass: one per node by fedkd, the rest by Flower's own function
    got = run_dispatch(link, Queue(), expected=len(pushed))
    assert sorted(m.metadata.message_id for m in got) == sorted(pushed)
    assert len([r for r in caplog.records if r.name == "fedkd"]) == 1
