"""Local training only: the no-federation reference point.

Clients train on their own shard every round and send nothing back but metrics;
there is no teacher, so `teacher_accuracy` is null and bytes are zero.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from fedkd.protocol import REPLY_NONE, ClientReply
from fedkd.round import Round
from strategies.base import STRATEGIES, Strategy
from strategies.client_half import NoUpload


@STRATEGIES.register("local")
class Local(Strategy):
    reply_kind = REPLY_NONE
    reply_record = None
    client_half = NoUpload
    uses_proxy = False
    has_server_model = False

    def aggregate(
        self, r: Round, replies: list[ClientReply]
    ) -> tuple[ArrayRecord | None, dict[str, Any]]:
        return None, {}
