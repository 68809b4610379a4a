"""review: CFeD-style review (Ma et al., IJCAI 2022), both halves.

Server: after the first task, a seeded `review_fraction` of each round's sampled
clients do not learn the new task. Their plan says `review`, and their download
carries the soft labels of the server model as it stood when the current task began
in place of the current teacher's. With a drifting proxy, `memory_size` items of
each past task's pool join the round's subset, since the current pool holds no
old-task data.

Client: a reviewer distills those soft labels on the proxy items only (no private
data) and replies as usual, so the aggregate keeps old knowledge alive.

Works with every strategy that has a server model and clients (dsfl, fedmd, feddf,
fedavg). Not with `local` (nothing to review) or `central` (no clients).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from fedkd.comm.codecs import encode
from fedkd.config import require
from fedkd.mitigations.base import MITIGATIONS, ClientRound, Mitigation, MitigationParams
from fedkd.protocol import ROLE_REVIEW, SOFT_LABELS, TEACHER, ProxySegment, RoundPlan
from fedkd.seeding import derive_seed, numpy_rng
from fedkd.training import soft_labels

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.round import Round


@dataclass
class ReviewParams(MitigationParams):
    review_fraction: float = 0.3  # share of each round's sampled clients that review
    memory_size: int = 1000  # drifting proxy: items per past task added to the subset

    def check(self, cfg: FedKDConfig) -> None:
        f, size = self.review_fraction, self.memory_size
        require(0 <= f <= 1, "mitigation.review_fraction", f, "in [0, 1]")
        require(size >= 1, "mitigation.memory_size", size, "an integer >= 1")


@MITIGATIONS.register("review")
class Review(Mitigation):
    Params = ReviewParams
    name = "review"
    needs_server_model = True
    needs_clients = True
    needs_proxy = True

    def __init__(self, cfg: FedKDConfig, params: ReviewParams) -> None:
        super().__init__(cfg, params)
        self.fraction = params.review_fraction
        self.size = params.memory_size
        self.snapshot = None  # the server model when the current task began
        self.tasks_done = 0
        self.reviewers: set[int] = set()
        self.review_labels: ArrayRecord | None = None

    # ------------------------------------------------------------- server half
    def on_task_end(self, task: int) -> None:
        self.snapshot = copy.deepcopy(self.context.server_model()).eval()
        self.tasks_done = task + 1

    def extra_segments(self, rnd: int) -> list[ProxySegment]:
        data, seed = self.context.data, self.context.seed
        if data.proxy_mode == "stationary" or self.snapshot is None:
            return []
        return [
            ProxySegment(
                t, derive_seed(seed, t, "review-memory"), min(self.size, data.proxy_pool_size(t))
            )
            for t in range(self.tasks_done)
        ]

    def begin_round(self, r: Round) -> None:
        self.reviewers, self.review_labels = set(), None
        sampled = r.sampled
        k = round(self.fraction * len(sampled))
        if self.snapshot is None or k == 0:
            return
        ctx = self.context
        pick = numpy_rng(ctx.seed, r.number, "reviewers").choice(
            len(sampled), size=k, replace=False
        )
        self.reviewers = {sampled[i] for i in pick}
        tau = self.cfg.distill.temperature
        probs = soft_labels(self.snapshot, r.proxy_x, tau, device=ctx.device)
        self.review_labels = encode(probs, ctx.download_codec, SOFT_LABELS, kind="probs")

    def adjust_plan(self, r: Round, pid: int, plan: RoundPlan) -> RoundPlan:
        if pid in self.reviewers:
            return replace(plan, role=ROLE_REVIEW, training=replace(plan.training, alpha=0.0))
        return plan

    def client_payload(self, r, pid, plan, payload):
        if plan.role != ROLE_REVIEW or self.review_labels is None:
            return payload
        return {**payload, TEACHER: self.review_labels}

    def state_dict(self) -> dict[str, Any]:
        snapshot = None if self.snapshot is None else self.snapshot.state_dict()
        return {"snapshot": snapshot, "tasks_done": self.tasks_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks_done = int(state["tasks_done"])
        self.snapshot = None
        if state["snapshot"] is not None:
            self.snapshot = copy.deepcopy(self.context.server_model()).eval()
            self.snapshot.load_state_dict(state["snapshot"])

    # ------------------------------------------------------------- client half
    def client_train(self, ctx: ClientRound) -> float | None:
        """A reviewer distills what the federation knew, on public data only."""
        if ctx.plan.role != ROLE_REVIEW or ctx.teacher_probs is None:
            return None
        hp = ctx.training
        return ctx.distill_on_proxy(hp.epochs, hp.lr, hp.batch_size, hp.momentum)
