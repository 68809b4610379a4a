"""FedDF (Lin et al., NeurIPS 2020): FedAvg, then ensemble distillation on the proxy set.

After averaging the clients' weights, the server distills the averaged model toward
the mean logits of the client models (which it holds) on unlabeled proxy data, with
Adam and early stopping on a held-out part of the round's proxy subset.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fedkd.distill import distillation_loss, mean_logits, tempered_softmax
from fedkd.errors import ConfigError
from fedkd.protocol import ClientReply
from fedkd.seeding import numpy_rng, torch_generator
from fedkd.training import distill_to_targets, predict_logits
from strategies.fedavg import FedAvg, cpu_state


class FedDF(FedAvg):
    uses_proxy = True

    def __init__(
        self, cfg: dict, distill_epochs: int = 10, holdout_fraction: float = 0.2, patience: int = 2
    ) -> None:
        super().__init__(cfg)
        if distill_epochs < 1:
            raise ConfigError("strategy.distill_epochs", distill_epochs, "an integer >= 1")
        if not 0 < holdout_fraction < 1:
            raise ConfigError("strategy.holdout_fraction", holdout_fraction, "a number in (0, 1)")
        if patience < 1:
            raise ConfigError("strategy.patience", patience, "an integer >= 1")
        self.distill_epochs = distill_epochs
        self.holdout_fraction = holdout_fraction
        self.patience = patience
        self.temperature = float(cfg["distill"]["temperature"])

    def ensemble_logits(self, replies: list[ClientReply], x: torch.Tensor) -> torch.Tensor:
        scratch = copy.deepcopy(self.model)
        outs = []
        for r in replies:
            scratch.load_state_dict(r.arrays.to_torch_state_dict())
            outs.append(predict_logits(scratch, x, device=self.device))
        return mean_logits(torch.stack(outs))

    def refine(self, rnd: int, replies: list[ClientReply]) -> dict[str, Any]:
        """Distill the averaged model toward the clients' ensemble on the proxy subset."""
        x = self.round_proxy_x
        target = tempered_softmax(self.ensemble_logits(replies, x), self.temperature)
        order = torch.from_numpy(numpy_rng(self.seed, rnd, "feddf-holdout").permutation(len(x)))
        n_val = max(1, int(len(x) * self.holdout_fraction))
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

        kd = self.cfg["distill"]
        opt = torch.optim.Adam(self.model.parameters(), lr=float(kd["server_lr"]))
        gen = torch_generator(self.seed, rnd, "feddf-distill")
        best, best_state, bad, used = val_loss(), cpu_state(self.model), 0, 0
        start = best
        for epoch in range(1, self.distill_epochs + 1):
            used = epoch
            distill_to_targets(
                self.model,
                x[fit],
                target[fit],
                temperature=self.temperature,
                epochs=1,
                lr=float(kd["server_lr"]),
                batch_size=int(kd["server_batch_size"]),
                generator=gen,
                device=self.device,
                optimizer=opt,
            )
            loss = val_loss()
            if loss < best - 1e-6:
                best, best_state, bad = loss, cpu_state(self.model), 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        self.model.load_state_dict(best_state)
        return {"distill_val_loss_start": start, "distill_val_loss": best, "distill_epochs": used}
