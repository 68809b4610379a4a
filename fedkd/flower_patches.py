"""One scaling fix for Flower 1.41's simulation engine, applied by `fedkd-sim`.

Flower's in-process engine hands instructions to the Ray workers from a thread that,
every 0.1 s, calls `LinkState.get_message_ins(node_id, limit=1)` for *every*
registered node, and each call scans *every* stored instruction:
O(nodes x messages) per pass under the state lock. At 10 nodes nobody notices; at
10,000 nodes with 10,000 handshake messages a single pass takes minutes, and with 100
messages a round it still costs seconds per pass.

`deliver_pending` does the same job in one scan of the stored instructions per pass
(O(messages)), with the same rules: expired or invalid instructions are dropped by
the state's own check, each is delivered once, at most one per node per pass. It reads
private parts of Flower's `InMemoryLinkState` (`lock`, `message_ins_store`,
`_check_stored_messages`), so it replaces `vce_api.add_messages_to_queue` only on the
Flower versions it was written against (elsewhere fedkd logs a warning and leaves
Flower as it is); should it still fail, the dispatch thread logs one warning and runs
Flower's own function for the rest of the run rather than dying and hanging it.
"""

from __future__ import annotations

import logging
import threading
from queue import Queue
from typing import Any

log = logging.getLogger("fedkd")

SUPPORTED = ("1.41.",)
POLL_SECONDS = 0.01


def deliver_pending(state: Any, nodes: set[int]) -> list[Any]:
    """Mark and return every undelivered instruction for `nodes`, one per node.

    Everything that reads Flower's internals runs before the first message is marked
    delivered, so if this raises, nothing has been taken and Flower's own function can
    carry on from the same state without losing or repeating a message.
    """
    from flwr.supercore.date import now

    with state.lock:
        pending = [
            mid
            for mid, msg in state.message_ins_store.items()
            if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes
        ]
        if not pending:
            return []
        state._check_stored_messages(set(pending))  # drops expired or invalid ones
        stamp, taken, out = now().isoformat(), set(), []
        for mid in pending:
            msg = state.message_ins_store.get(mid)
            node = msg.metadata.dst_node_id if msg is not None else None
            if msg is None or node in taken or msg.metadata.delivered_at != "":
                continue
            taken.add(node)
            out.append(msg)
        for msg in out:  # only now mark them, as Flower's get_message_ins does
            msg.metadata.delivered_at = stamp
        return out


def _add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Flower's `add_messages_to_queue` (same signature), with Flower's as the fallback."""
    try:
        nodes = set(nodes_mapping)
        while not f_stop.is_set():
            for msg in deliver_pending(state, nodes):
                queue.put(msg)
            f_stop.wait(POLL_SECONDS)
    except Exception as exc:
        log.warning(
            "fedkd's simulation-engine dispatch failed (%s: %s); "
            "using Flower's own for the rest of this run",
            type(exc).__name__,
            exc,
        )
        _original()(state, queue, nodes_mapping, f_stop)


_ORIGINAL: dict[str, Any] = {}


def _original() -> Any:
    """Flower's own `add_messages_to_queue`, as saved before the fix was installed."""
    if "add_messages_to_queue" not in _ORIGINAL:
        from flwr.server.superlink.fleet.vce import vce_api

        if vce_api.add_messages_to_queue is _add_messages_to_queue:
            raise RuntimeError("Flower's add_messages_to_queue was replaced but not saved")
        _ORIGINAL["add_messages_to_queue"] = vce_api.add_messages_to_queue
    return _ORIGINAL["add_messages_to_queue"]


def configure(enabled: bool) -> bool:
    """Install the fix (or put Flower's own function back); True if it is active."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    original = _original()
    if not enabled:
        vce_api.add_messages_to_queue = original
        return False
    if not flwr.__version__.startswith(SUPPORTED):
        log.warning(
            "flwr %s: fedkd's simulation-engine fix targets %s; not applied",
            flwr.__version__,
            SUPPORTED,
        )
        return False
    vce_api.add_messages_to_queue = _add_messages_to_queue
    return True
