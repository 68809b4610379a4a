"""review: CFeD-style review (Ma et al., IJCAI 2022).

After the first task, a seeded `review_fraction` of each round's sampled clients do
not learn the new task: they distill, on proxy data only, the server model as it
stood when the current task began (its soft labels replace the current teacher's in
their download) and reply as usual, so the aggregate keeps old knowledge alive.
With a drifting proxy, `memory_size` items of each past task's pool are added to the
round's subset, since the current pool holds no old-task data.

Works with every strategy that has a server model and clients (dsfl, fedmd, feddf,
fedavg). Not with `local` (nothing to review) or `central` (no clients).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord

from fedkd.comm.codecs import encode
from fedkd.mitigations.base import Mitigation
from fedkd.protocol import ROLE_REVIEW, SOFT_LABELS, TEACHER, ProxySegment
from fedkd.seeding import derive_seed, numpy_rng
from fedkd.training import soft_labels


class Review(Mitigation):
    name = "review"
    needs_server_model = True
    needs_clients = True
    needs_proxy = True

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.fraction = float(self.params.get("review_fraction", 0.3))
        self.size = int(self.params.get("memory_size", 1000))
        self.snapshot = None  # the server model when the current task began
        self.tasks_done = 0
        self.reviewers: set[int] = set()
        self.review_labels: ArrayRecord | None = None

    def on_task_end(self, strategy, task: int) -> None:
        self.snapshot = copy.deepcopy(strategy.server_model).eval()
        self.tasks_done = task + 1

    def extra_segments(self, strategy, rnd: int) -> list[ProxySegment]:
        data = strategy.data
        if data.proxy_mode == "stationary" or self.snapshot is None:
            return []
        return [
            ProxySegment(
                t,
                derive_seed(strategy.seed, t, "review-memory"),
                min(self.size, data.proxy_pool_size(t)),
            )
            for t in range(self.tasks_done)
        ]

    def begin_round(self, strategy, rnd: int) -> None:
        self.reviewers, self.review_labels = set(), None
        sampled = strategy.ledger.sampled
        k = round(self.fraction * len(sampled))
        if self.snapshot is None or k == 0:
            return
        pick = numpy_rng(strategy.seed, rnd, "reviewers").choice(
            len(sampled), size=k, replace=False
        )
        self.reviewers = {sampled[i] for i in pick}
        tau = float(self.cfg["distill"]["temperature"])
        probs = soft_labels(self.snapshot, strategy.round_proxy_x, tau, device=strategy.device)
        codec = getattr(strategy, "download_codec", "float16")
        self.review_labels = encode(probs, codec, SOFT_LABELS, kind="probs")

    def adjust_plan(self, strategy, rnd, pid, plan):
        if pid in self.reviewers:
            return replace(plan, role=ROLE_REVIEW, alpha=0.0)
        return plan

    def client_payload(self, strategy, rnd, pid, plan, payload):
        if plan.role != ROLE_REVIEW or self.review_labels is None:
            return payload
        return {**payload, TEACHER: self.review_labels}

    def state_dict(self) -> dict[str, Any]:
        snapshot = None if self.snapshot is None else self.snapshot.state_dict()
        return {"snapshot": snapshot, "tasks_done": self.tasks_done}

    def load_state_dict(self, state: dict[str, Any], strategy) -> None:
        self.tasks_done = int(state["tasks_done"])
        self.snapshot = None
        if state["snapshot"] is not None:
            self.snapshot = copy.deepcopy(strategy.server_model).eval()
            self.snapshot.load_state_dict(state["snapshot"])
