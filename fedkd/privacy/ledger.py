"""The server's privacy ledger: every privacy cost of the run, in one place.

- `privacy.mode=sample`: clients run DP-SGD and account for themselves; the ledger
  keeps the epsilon each one last reported and reports the worst-off client's.
- `privacy.mode=client`: the server adds the noise (`noisy_mean`), so the ledger
  both applies the mechanism and counts it; nothing can be noised without being
  accounted. Epsilon is composed over the noised rounds at the client sampling
  rate (see fedkd/privacy/__init__.py for the approximation).

It also records where the noise came from (`dp_noise`: the OS CSPRNG, or a seeded
stream; for DP-SGD as the clients report it) and what clients withheld.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedkd.privacy.accounting import gaussian_epsilon
from fedkd.privacy.noise import SECURE, SEEDED, DPNoise
from fedkd.privacy.release import withheld
from fedkd.privacy.upload import noisy_mean
from fedkd.seeding import torch_generator

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


class PrivacyLedger:
    def __init__(self, cfg: FedKDConfig) -> None:
        self.privacy = cfg.privacy
        self.seed = cfg.seed
        self.clients_per_round = cfg.clients_per_round
        self.sample_rate = cfg.clients_per_round / cfg.num_clients
        self.client_epsilon: dict[int, float] = {}  # sample: as clients report it
        self.noised_rounds = 0  # client: noised aggregations so far
        self.client_noise: dict[int, str] = {}  # sample: each client's noise, as reported

    def set_population(self, admitted: int) -> None:
        """Sample over the partitions that passed the handshake, not the configured
        num_clients: fewer admitted means each is sampled more often (with all
        admitted the rate is the configured one, bit for bit)."""
        if admitted > 0:
            self.sample_rate = min(self.clients_per_round, admitted) / admitted

    @property
    def client_level(self) -> bool:
        return self.privacy.mode == "client"

    def record_reply(self, partition_id: int, metrics: dict[str, Any]) -> None:
        """Keep what a valid reply says about its client's own DP-SGD spending."""
        if "dp-epsilon" in metrics:
            self.client_epsilon[partition_id] = float(metrics["dp-epsilon"])
        if "dp-secure-noise" in metrics:
            secure = bool(metrics["dp-secure-noise"])
            self.client_noise[partition_id] = SECURE if secure else SEEDED

    def noisy_mean(self, uploads: torch.Tensor, rnd: int) -> torch.Tensor:
        """(K, n, C) uploads -> (n, C): the client-level DP mean of round `rnd`."""
        pv = self.privacy
        seeded = None if pv.secure_noise else torch_generator(self.seed, rnd, "dp-noise")
        mean = noisy_mean(uploads, pv.clip_norm, pv.noise_multiplier, DPNoise(seeded))
        self.noised_rounds += 1
        return mean

    def stats(self) -> dict[str, float]:
        """The privacy spent so far: epsilon at delta, for the worst-off client's data
        (sample), or for any client's participation (client)."""
        pv = self.privacy
        if pv.mode == "none":
            return {}
        if pv.mode == "sample":
            eps = max(self.client_epsilon.values(), default=0.0)
        else:
            eps = gaussian_epsilon(
                pv.noise_multiplier, [(self.sample_rate, self.noised_rounds)], pv.delta
            )
        return {
            "epsilon": eps,
            "delta": pv.delta,
            "noise_multiplier": pv.noise_multiplier,
            "dp_noise": self.noise_kind(),
        }

    def noise_kind(self) -> str:
        """Where the noise came from: the server's own (client), or what every client
        reported (sample; "mixed" when they differ, as when devices insist on secret
        noise under a config that asked for seeded noise)."""
        if self.privacy.mode == "sample" and self.client_noise:
            kinds = set(self.client_noise.values())
            return kinds.pop() if len(kinds) == 1 else "mixed"
        return SECURE if self.privacy.secure_noise else SEEDED

    def summary(self) -> dict[str, Any]:
        """For summary.json: the noise's source and what clients withheld under DP."""
        if self.privacy.mode == "none":
            return {}
        return {"dp_noise": self.noise_kind(), "dp_withheld": withheld(self.privacy.mode)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "client_epsilon": dict(self.client_epsilon),
            "noised_rounds": self.noised_rounds,
            "client_noise": dict(self.client_noise),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client_epsilon = {int(k): float(v) for k, v in state["client_epsilon"].items()}
        self.noised_rounds = int(state["noised_rounds"])
        noise = state.get("client_noise", {})  # absent in checkpoints before secure noise
        self.client_noise = {int(k): v for k, v in noise.items() if v in (SECURE, SEEDED)}
