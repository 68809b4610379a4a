"""The simulation-engine fix delivers like Flower does: each pending instruction once,
at most one per node per pass, only to the engine's nodes, after the state's own
expiry check."""

import threading
from types import SimpleNamespace

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
