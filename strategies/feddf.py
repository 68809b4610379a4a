"""FedDF (Lin et al., NeurIPS 2020): FedAvg, then ensemble distillation on the proxy set.

After averaging the clients' weights, the server distills the averaged model toward
the mean logits of the client models (which it holds) on unlabeled proxy data, with
Adam and early stopping on a held-out part of the round's proxy subset. The client
models are FedAvg's checked and clipped ones, in the ensemble as in the average.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedkd.config import require
from fedkd.distill import distillation_loss, mean_logits, tempered_softmax
from fedkd.protocol import ClientReply
from fedkd.round import Round
from fedkd.seeding import numpy_rng, torch_generator
from fedkd.training import distill_to_targets, predict_logits
from strategies.base import STRATEGIES
from strategies.fedavg import FedAvg, FedAvgParams, cpu_state

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


@dataclass
class FedDFParams(FedAvgParams):
    distill_epochs: int = 10  # at most, with early stopping on a held-out part
    holdout_fraction: float = 0.2
    patience: int = 2

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        for key in ("distill_epochs", "patience"):
            value = getattr(self, key)
            require(value >= 1, f"strategy.{key}", value, "an integer >= 1")
        h = self.holdout_fraction
        require(0 < h < 1, "strategy.holdout_fraction", h, "a number in (0, 1)")


@STRATEGIES.register("feddf")
class FedDF(FedAvg):
    Params = FedDFParams
    uses_proxy = True

    def __init__(self, cfg: FedKDConfig, params: FedDFParams) -> None:
        super().__init__(cfg, params)
        self.temperature = cfg.distill.temperature

    def ensemble_logits(self, replies: list[ClientReply], x: torch.Tensor) -> torch.Tensor:
        scratch = copy.deepcopy(self.model)
        outs = []
        for r in replies:
            scratch.load_state_dict(r.arrays)  # decoded by FedAvg.check_payload
            outs.append(predict_logits(scratch, x, device=self.device))
        return mean_logits(torch.stack(outs))

    def refine(self, r: Round, replies: list[ClientReply]) -> dict[str, Any]:
        """Distill the averaged model toward the clients' ensemble on the proxy subset."""
        x, rnd = r.proxy_x, r.number
        target = tempered_softmax(self.ensemble_logits(replies, x), self.temperature)
        order = torch.from_numpy(numpy_rng(self.seed, rnd, "feddf-holdout").permutation(len(x)))
        n_val = max(1, int(len(x) * self.p.holdout_fraction))
        val, fit = order[:n_val], order[n_val:]

        def val_loss() -> float:
            with torch.no_grad():
                return float(
                    distillation_loss(
                        predict_logits(self.model, x[val], device=self.device),
                        target[val],
                        self.temperature,
                    )
                )

        kd = self.cfg.distill
        opt = self.server_optimizer(self.model)  # fresh each round, as in FedDF
        gen = torch_generator(self.seed, rnd, "feddf-distill")
        best, best_state, bad, used = val_loss(), cpu_state(self.model), 0, 0
        start = best
        for epoch in range(1, self.p.distill_epochs + 1):
            used = epoch
            distill_to_targets(
                self.model,
                x[fit],
                target[fit],
                temperature=self.temperature,
                epochs=1,
                lr=kd.server_lr,
                batch_size=kd.server_batch_size,
                generator=gen,
                device=self.device,
                optimizer=opt,
                shuffle=kd.shuffle,
            )
            loss = val_loss()
            if loss < best - 1e-6:
                best, best_state, bad = loss, cpu_state(self.model), 0
            else:
                bad += 1
                if bad >= self.p.patience:
                    break
        self.model.load_state_dict(best_state)
        return {"distill_val_loss_start": start, "distill_val_loss": best, "distill_epochs": used}
