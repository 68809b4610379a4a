"""The typed config schema (Hydra ConfigStore), each section with its own checks.

Hydra merges `conf/` into these dataclasses, so a wrong type or an unknown key fails
at composition; `typed` gives the typed config and `FedKDConfig.check` runs every
section's `check`. Every failure is a `ConfigError` naming the key, the value and what
is allowed. Code reads settings from the typed config, never by casting dict values.

The schema only: this package imports no component (strategies, mitigations) and not
the composition layer. A component's own settings parse with `parse_params`; building
the strategy and the mitigation is `fedkd.components`; checking that they fit
together and the rest of the config (strategy x mitigation x privacy) is
`fedkd.compose.validate`, which runs before any data is loaded or any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fedkd.config.checks import one_of, require
from fedkd.config.data import (
    DatasetConfig,
    EvalConfig,
    LifelongConfig,
    PartitionConfig,
    ProxyConfig,
    SyntheticConfig,
)
from fedkd.config.learning import DistillConfig, ModelConfig, TrainConfig
from fedkd.config.runtime import (
    FaultsConfig,
    LoggerConfig,
    OutputConfig,
    PrivacyConfig,
    SimulationConfig,
)
from fedkd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
P = TypeVar("P")


@dataclass
class FedKDConfig:
    seed: int = 0
    rounds: int = 20
    num_clients: int = 10
    clients_per_round: int = 10
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Any = MISSING  # conf/strategy/: `name` and the strategy's own Params
    mitigation: Any = MISSING  # conf/mitigation/: `name` and the mitigation's own Params
    plugins: list[str] = field(default_factory=list)  # modules that register components
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lifelong: LifelongConfig = field(default_factory=LifelongConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # conf/logger/: trackers

    def check(self) -> None:
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        require(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        require(self.num_clients >= 1, "num_clients", self.num_clients, "an integer >= 1")
        require(
            1 <= self.clients_per_round <= self.num_clients,
            "clients_per_round",
            self.clients_per_round,
            f"an integer from 1 to num_clients ({self.num_clients})",
        )
        for section in (self.dataset, self.partition, self.model, self.proxy, self.train):
            section.check()
        for section in (self.distill, self.eval):
            section.check()
        self.lifelong.check(self)
        self.simulation.check()
        self.faults.check(self)
        self.privacy.check()
        self.logger.check()


ConfigStore.instance().store(name="fedkd_schema", node=FedKDConfig)

RUNTIME_KEYS = ("node",)  # set at run time on a device (fedkd.app), not by conf/


def typed(cfg: dict[str, Any] | DictConfig) -> FedKDConfig:
    """The typed view of a composed (or plain, resolved) config."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain = {k: v for k, v in plain.items() if k not in RUNTIME_KEYS}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FedKDConfig), plain))


def parse_params(schema: type[P], node: dict[str, Any], key: str, owner: str) -> P:
    """A component's config node (`strategy`, `mitigation`) as its Params dataclass:
    unknown keys and wrong types fail with one line naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    allowed = ", ".join(f.name for f in fields(schema) if f.name != "name") or "none"
    for name, value in node.items():
        if name not in {f.name for f in fields(schema)}:
            raise ConfigError(
                f"{key}.{name}", value, f"not a {owner} setting; its settings are {allowed}"
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), dict(node))
    except OmegaConfBaseException as exc:
        name = getattr(exc, "full_key", "") or "?"
        want = next((f.type for f in fields(schema) if f.name == name), "another type")
        raise ConfigError(f"{key}.{name}", node.get(name), f"a value of type {want}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


__all__ = [
    "CONF_DIR",
    "DatasetConfig",
    "DistillConfig",
    "EvalConfig",
    "FaultsConfig",
    "FedKDConfig",
    "LifelongConfig",
    "LoggerConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "ProxyConfig",
    "SimulationConfig",
    "SyntheticConfig",
    "TrainConfig",
    "one_of",
    "parse_params",
    "require",
    "typed",
]
