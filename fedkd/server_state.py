"""Everything the server holds between rounds, built in one place and checkpointed
and restored whole: the strategy, the mitigation, the lifelong evaluation, the
privacy ledger, the round reached and the RNG states.

`checkpoint.pt` (fedkd/checkpoint.py) is `ServerState.state_dict()`. Clients keep
their own state in the client store. Every random stream is derived from (seed,
round, partition id), so round r + 1 replays identically after a resume. The state
holds tensors and plain values only (the numpy RNG state too), so the checkpoint
loads with `weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedkd.checkpoint import CHECKPOINT, CheckpointError, config_digest
from fedkd.config import FedKDConfig, typed
from fedkd.data.federated import FederatedData, federated_data
from fedkd.evaluation import LifelongEvaluation
from fedkd.mitigations import Mitigation, MitigationContext, build_mitigation
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
    declared_examples: dict[int, int] = field(default_factory=dict)  # handshake shard sizes
    round: int = 0  # the last finished round
    ray_nodes: set[str] = field(default_factory=set)  # where clients ran (simulation)
    # partitions with a valid reply so far: only a first reply may carry a baseline
    participated: set[int] = field(default_factory=set)

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
            "participated": sorted(self.participated),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": numpy_rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round played is ckpt["round"] + 1.
        A part that does not fit this run (a damaged or tampered file) is a
        CheckpointError naming it, not a traceback."""
        for key, part in self.parts().items():
            with _restoring(key):
                part.load_state_dict(ckpt[key])
        with _restoring("ray_nodes"):
            self.ray_nodes = {str(n) for n in ckpt["ray_nodes"]}
        with _restoring("participated"):  # absent from checkpoints of older versions
            self.participated = {int(p) for p in ckpt.get("participated", [])}
        with _restoring("torch_rng"):
            torch.set_rng_state(ckpt["torch_rng"])
        with _restoring("numpy_rng"):
            set_numpy_rng_state(ckpt["numpy_rng"])
        self.round = int(ckpt["round"])


@contextmanager
def _restoring(key: str) -> Iterator[None]:
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # any way a damaged part can fail to load
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{CHECKPOINT}: damaged checkpoint ({key}: {type(exc).__name__}: {first})"
        ) from None


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as plain values (its tuple holds an ndarray, which
    the weights-only loader refuses)."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.uint32).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    key = state["key"]
    if not isinstance(key, torch.Tensor) or key.dtype != torch.uint32:
        raise TypeError("key is not a uint32 tensor")
    np.random.set_state(
        (
            str(state["bit_generator"]),
            key.numpy().astype(np.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def check_restorable(plain: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Restore `ckpt` into a scratch server state (on the CPU): a checkpoint that does
    not fit the run fails here, before Ray starts, rather than inside the ServerApp.
    (It sets the global RNG states; the real restore sets them again.)"""
    build_server_state(plain, "cpu").load_state_dict(ckpt)


def build_server_state(plain: dict[str, Any], device: str) -> ServerState:
    """The server of a run: strategy and mitigation built, set up and attached."""
    cfg = typed(plain)
    data = federated_data(plain)
    mitigation = build_mitigation(cfg)
    privacy = PrivacyLedger(cfg)
    strategy = build_strategy(cfg)
    strategy.setup(ServerContext(cfg, data, device, mitigation, privacy))
    mitigation.attach(mitigation_context(strategy))
    evaluation = LifelongEvaluation(data, device)
    return ServerState(plain, cfg, data, strategy, mitigation, evaluation, privacy)


def mitigation_context(strategy: Strategy) -> MitigationContext:
    """What the mitigation's server hooks see of a set-up strategy: its data, seed and
    device, its server model as it stands, and the codec of its teacher's soft labels
    (a soft-label strategy's `download_codec`; float16 for the others)."""
    return MitigationContext(
        data=strategy.data,
        seed=strategy.seed,
        device=strategy.device,
        server_model=lambda: strategy.server_model,
        download_codec=getattr(strategy, "download_codec", "float16"),
    )
