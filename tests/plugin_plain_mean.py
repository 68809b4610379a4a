"""A strategy that knows nothing about privacy: it decodes every upload it is given
and keeps their plain mean as its state. Under `privacy.mode=client` the privacy
layer must still hand it only the noised mean (tests/test_privacy_layer.py)."""

from __future__ import annotations

import torch

from fedkd.comm.codecs import check, decode
from fedkd.protocol import KNOWLEDGE, LOGITS, InvalidReply
from strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("plain_mean")
class PlainMean(Strategy):
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.seen: list[tuple[list[int], torch.Tensor]] = []  # (partitions, their mean)

    def check_payload(self, r, content):
        record = content.array_records.get(KNOWLEDGE)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {KNOWLEDGE!r}")
        check(record, self.codec, LOGITS, r.knowledge_shape)
        return decode(record, LOGITS, self.codec, r.knowledge_shape)

    def aggregate(self, r, replies):
        mean = torch.stack([c.arrays for c in replies]).mean(0)
        self.seen.append(([c.partition_id for c in replies], mean))
        return None, {}
