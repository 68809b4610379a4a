"""A mitigation defined outside fedkd, as a user would write one: after each task the
server remembers `items` proxy items of that task's pool and adds them to every later
round's subset, so students keep distilling on old tasks' public data. Its client
hook reports how many proxy items the student distilled on."""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.config import require
from fedkd.mitigations import MITIGATIONS, ClientExtras, Mitigation, MitigationParams
from fedkd.protocol import ProxySegment
from fedkd.seeding import derive_seed


@dataclass
class RehearsalParams(MitigationParams):
    items: int = 50  # proxy items remembered per finished task

    def check(self, cfg) -> None:
        require(self.items >= 1, "mitigation.items", self.items, "an integer >= 1")


@MITIGATIONS.register("rehearsal")
class Rehearsal(Mitigation):
    Params = RehearsalParams
    name = "rehearsal"
    needs_clients = True

    def __init__(self, cfg, params: RehearsalParams) -> None:
        super().__init__(cfg, params)
        self.finished: list[int] = []

    def on_task_end(self, task: int) -> None:
        self.finished.append(task)

    def extra_segments(self, rnd: int) -> list[ProxySegment]:
        data, seed = self.context.data, self.context.seed
        return [
            ProxySegment(
                t,
                derive_seed(seed, t, "rehearsal"),
                min(self.params.items, data.proxy_pool_size(t)),
            )
            for t in self.finished
        ]

    def client_extras(self, ctx) -> ClientExtras:
        return ClientExtras(ctx.x, ctx.y, info={"kd-items": len(ctx.kd_x)})

    def state_dict(self) -> dict:
        return {"finished": list(self.finished)}

    def load_state_dict(self, state: dict) -> None:
        self.finished = list(state["finished"])
