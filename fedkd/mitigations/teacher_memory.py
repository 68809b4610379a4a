"""teacher_memory: the server remembers what past teachers knew on the proxy set.

At the end of each task the server stores the teacher's soft labels on `memory_size`
items of that task's proxy pool. Each later teacher update distills toward the new
aggregate on the round's subset *and* toward that memory, the memory carrying
`memory_weight` of the total weight. With a drifting proxy this is server-side
rehearsal on remembered public data; with a stationary one it anchors the teacher's
old answers on the same public samples. Purely server-side: no extra bytes.

Works with every strategy that has a server model (dsfl, fedmd, feddf, fedavg; for
the weight strategies the averaged model is distilled toward the memory, anchored
on its own outputs on the round's subset). Not with `local` (no server model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedkd.config import require
from fedkd.mitigations.base import MITIGATIONS, Mitigation, MitigationParams
from fedkd.protocol import ProxySegment
from fedkd.seeding import derive_seed
from fedkd.training import soft_labels

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


@dataclass
class TeacherMemoryParams(MitigationParams):
    memory_weight: float = 0.5  # share of the teacher loss on the memory
    memory_size: int = 1000  # proxy items remembered per past task

    def check(self, cfg: FedKDConfig) -> None:
        w, size = self.memory_weight, self.memory_size
        require(0 <= w < 1, "mitigation.memory_weight", w, "in [0, 1)")
        require(size >= 1, "mitigation.memory_size", size, "an integer >= 1")


@MITIGATIONS.register("teacher_memory")
class TeacherMemory(Mitigation):
    Params = TeacherMemoryParams
    name = "teacher_memory"
    needs_server_model = True
    needs_proxy = True  # the current subset anchors new knowledge during memory distillation
    distills_server_model = True

    def __init__(self, cfg: FedKDConfig, params: TeacherMemoryParams) -> None:
        super().__init__(cfg, params)
        self.weight = params.memory_weight
        self.size = params.memory_size
        self.memory: list[tuple[ProxySegment, torch.Tensor]] = []

    def task_segment(self, task: int) -> ProxySegment:
        """The `memory_size` items of task `task`'s proxy pool the memory is about."""
        ctx = self.context
        count = min(self.size, ctx.data.proxy_pool_size(task))
        return ProxySegment(task, derive_seed(ctx.seed, task, "teacher-memory"), count)

    def on_task_end(self, task: int) -> None:
        ctx = self.context
        seg = self.task_segment(task)
        x = ctx.data.proxy_inputs([seg])
        tau = self.cfg.distill.temperature
        self.memory.append((seg, soft_labels(ctx.server_model(), x, tau, device=ctx.device)))

    def memory_inputs(self) -> torch.Tensor:
        """The remembered items, in memory order: public proxy items of past tasks."""
        return self.context.data.proxy_inputs([seg for seg, _ in self.memory])

    def teacher_batch(self, x: torch.Tensor, target: torch.Tensor):
        if not self.memory or self.weight <= 0:
            return x, target, None
        mem_x = self.memory_inputs()
        mem_t = torch.cat([probs for _, probs in self.memory])
        # memory items share `weight` of the total mass, current items the rest
        w_new = torch.full((len(x),), (1 - self.weight) / max(len(x), 1))
        w_mem = torch.full((len(mem_x),), self.weight / len(mem_x))
        return torch.cat([x, mem_x]), torch.cat([target, mem_t]), torch.cat([w_new, w_mem])

    def state_dict(self) -> dict[str, Any]:
        return {"memory": [((s.task, s.seed, s.count), p) for s, p in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = [(ProxySegment(*seg), probs) for seg, probs in state["memory"]]
