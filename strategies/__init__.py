"""Server strategies: one file each, one `conf/strategy/<name>.yaml` each.

A strategy config names its class with `_target_` and its own settings beside it;
`build_strategy(cfg)` constructs it with the full resolved config.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class

from fedkd.errors import ConfigError
from strategies.base import FederatedStrategy, ServerContext, sample_partitions


def strategy_class(target: str) -> type[FederatedStrategy]:
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(
            "strategy._target_", target, "an importable FederatedStrategy class"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, FederatedStrategy)):
        raise ConfigError(
            "strategy._target_", target, "a subclass of strategies.base.FederatedStrategy"
        )
    return cls


def build_strategy(cfg: dict[str, Any]) -> FederatedStrategy:
    """Construct the configured strategy (cheap: models are built in `setup()`)."""
    node = dict(cfg["strategy"])
    cls = strategy_class(node.pop("_target_"))
    node.pop("name", None)
    return cls(cfg, **node)


__all__ = [
    "FederatedStrategy",
    "ServerContext",
    "build_strategy",
    "sample_partitions",
    "strategy_class",
]
