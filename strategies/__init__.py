"""Server strategies: one file each, one `conf/strategy/<name>.yaml` each.

A strategy registers itself with `@STRATEGIES.register("name")`; its config node is
`name` plus the fields of its `Params` dataclass.
"""

from __future__ import annotations

from typing import Any

from fedkd.config import FedKDConfig, parse_params
from strategies.base import STRATEGIES, ServerContext, Strategy, sample_partitions


def strategy_class(name: str) -> type[Strategy]:
    return STRATEGIES.get(name)


def build_strategy(cfg: FedKDConfig) -> Strategy:
    """Construct the configured strategy (cheap: models are built in `setup()`)."""
    cls = strategy_class(cfg.strategy["name"])
    node: dict[str, Any] = dict(cfg.strategy)
    return cls(cfg, parse_params(cls.Params, node, "strategy", node["name"]))


__all__ = [
    "STRATEGIES",
    "ServerContext",
    "Strategy",
    "build_strategy",
    "sample_partitions",
    "strategy_class",
]
