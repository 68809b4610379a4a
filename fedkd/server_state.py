"""Everything the server holds between rounds, built in one place and checkpointed
and restored whole: the strategy, the mitigation, the lifelong evaluation, the
privacy ledger, the round reached and the RNG states.

`checkpoint.pt` (fedkd/checkpoint.py) is `ServerState.state_dict()`. Clients keep
their own state in the client store. Every random stream is derived from (seed,
round, partition id), so round r + 1 replays identically after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedkd.checkpoint import config_digest
from fedkd.config import FedKDConfig, typed
from fedkd.data.federated import FederatedData, federated_data
from fedkd.evaluation import LifelongEvaluation
from fedkd.mitigations import Mitigation, build_mitigation
from fedkd.privacy.ledger import PrivacyLedger
from strategies import ServerContext, Strategy, build_strategy


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ServerState:
    plain: dict[str, Any]  # the resolved config as written to config.yaml
    cfg: FedKDConfig
    data: FederatedData
    strategy: Strategy
    mitigation: Mitigation
    evaluation: LifelongEvaluation
    privacy: PrivacyLedger
    population: list[int] = field(default_factory=list)  # partitions admitted
    round: int = 0  # the last finished round
    ray_nodes: set[str] = field(default_factory=set)  # where clients ran (simulation)

    def parts(self) -> dict[str, Stateful]:
        """The components with state of their own, by checkpoint key."""
        return {
            "state": self.strategy,
            "mitigation": self.mitigation,
            "evaluation": self.evaluation,
            "privacy": self.privacy,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "strategy": self.strategy.name,
            "config_digest": config_digest(self.plain),
            **{key: part.state_dict() for key, part in self.parts().items()},
            "ray_nodes": sorted(self.ray_nodes),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round played is ckpt["round"] + 1."""
        for key, part in self.parts().items():
            part.load_state_dict(ckpt[key])
        self.ray_nodes = set(ckpt["ray_nodes"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        self.round = int(ckpt["round"])


def build_server_state(plain: dict[str, Any], device: str) -> ServerState:
    """The server of a run: strategy and mitigation built, set up and attached."""
    cfg = typed(plain)
    data = federated_data(plain)
    mitigation = build_mitigation(cfg)
    privacy = PrivacyLedger(cfg)
    strategy = build_strategy(cfg)
    strategy.setup(ServerContext(cfg, data, device, mitigation, privacy))
    mitigation.attach(strategy)
    evaluation = LifelongEvaluation(data, device)
    return ServerState(plain, cfg, data, strategy, mitigation, evaluation, privacy)
