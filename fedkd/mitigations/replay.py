"""replay: a small private exemplar buffer per client (a non-distillation reference).

When a client moves to a new task it keeps `replay_size` random samples of the task
it leaves (its own private data, never sent anywhere) and trains on them together
with the new task's data. Client-side only.

Works with every strategy whose clients train (dsfl, fedmd, feddf, fedavg, local).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedkd.config import require
from fedkd.mitigations import MITIGATIONS, ClientExtras, Mitigation, MitigationParams
from fedkd.seeding import numpy_rng

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound


@dataclass
class ReplayParams(MitigationParams):
    replay_size: int = 100  # private exemplars kept per past task per client

    def check(self, cfg: FedKDConfig) -> None:
        size = self.replay_size
        require(size >= 1, "mitigation.replay_size", size, "an integer >= 1")


@MITIGATIONS.register("replay")
class Replay(Mitigation):
    Params = ReplayParams
    name = "replay"
    needs_clients = True
    trains_on_private_data = True

    def client_extras(self, ctx: ClientRound) -> ClientExtras:
        buffer = ctx.state.setdefault("replay", {})  # task -> rows of private_index
        old = ctx.previous_task
        if ctx.new_task and old is not None and str(old) not in buffer:
            shard = ctx.data.task_shards[old][ctx.partition_id]
            size = min(self.params.replay_size, len(shard))
            pick = numpy_rng(ctx.data.seed, ctx.partition_id, old, "replay").choice(
                len(shard), size, replace=False
            )
            buffer[str(old)] = torch.from_numpy(np.sort(shard[pick]))
        xs, ys = [ctx.x], [ctx.y]
        for task, rows in sorted(buffer.items()):
            if int(task) == ctx.plan.task:
                continue
            x, y = ctx.data.rows_data(rows.numpy(), int(task))
            xs.append(x)
            ys.append(y)
        return ClientExtras(
            torch.cat(xs), torch.cat(ys), info={"replay-samples": sum(len(y) for y in ys[1:])}
        )
