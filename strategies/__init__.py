"""Server strategies: one file each, one `conf/strategy/<name>.yaml` each.

A strategy registers itself with `@STRATEGIES.register("name")`; its config node is
`name` plus the fields of its `Params` dataclass.
"""

from __future__ import annotations

from fedkd.components import build_component
from fedkd.config import FedKDConfig
from strategies.base import STRATEGIES, ServerContext, Strategy, sample_partitions


def build_strategy(cfg: FedKDConfig) -> Strategy:
    """Construct the configured strategy (cheap: models are built in `setup()`)."""
    return build_component(STRATEGIES, cfg, "strategy")


__all__ = [
    "STRATEGIES",
    "ServerContext",
    "Strategy",
    "build_strategy",
    "sample_partitions",
]
