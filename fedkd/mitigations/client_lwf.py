"""client_lwf: each client distills its own previous student while learning a new task.

Learning without Forgetting (Li & Hoiem 2016), as in FLwF (Usmanova et al. 2021):
when a client meets a new task it freezes a copy of its student as it stood at the
end of the previous task, and adds `lwf_weight * tau^2 * KL(prev || student)` on its
new private data to the usual loss. Client-side only; the server is unchanged.

Works with every strategy whose clients train (dsfl, fedmd, feddf, fedavg, local).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedkd.config import require
from fedkd.mitigations import MITIGATIONS, ClientExtras, Mitigation, MitigationParams
from fedkd.training import soft_labels

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound


@dataclass
class ClientLwFParams(MitigationParams):
    lwf_weight: float = 1.0  # weight of the KD toward the previous student

    def check(self, cfg: FedKDConfig) -> None:
        require(self.lwf_weight >= 0, "mitigation.lwf_weight", self.lwf_weight, "a number >= 0")


@MITIGATIONS.register("client_lwf")
class ClientLwF(Mitigation):
    Params = ClientLwFParams
    name = "client_lwf"
    needs_clients = True
    trains_on_private_data = True

    def client_extras(self, ctx: ClientRound) -> ClientExtras:
        if ctx.new_task:
            ctx.state["prev_model"] = copy.deepcopy(ctx.student.state_dict())
        if "prev_model" not in ctx.state:
            return ClientExtras(ctx.x, ctx.y)
        prev = copy.deepcopy(ctx.student)
        prev.load_state_dict(ctx.state["prev_model"])
        probs = soft_labels(prev, ctx.x, ctx.training.temperature, device=ctx.device)
        return ClientExtras(ctx.x, ctx.y, probs, self.params.lwf_weight)
