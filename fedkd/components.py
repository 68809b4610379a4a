"""Building the components a config names (`strategy`, `mitigation`): each from its
registry, with its own `Params` dataclass parsed from its config node and checked.

Above the config (fedkd/config/: the schema, which imports no component) and below
the composition (`fedkd.compose.validate`, which checks that the built components fit
together). Strategies and mitigations build themselves through here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedkd.config import parse_params

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.registry import Registry


def build_component(registry: Registry, cfg: FedKDConfig, key: str) -> Any:
    """The component that config node `key` (`strategy`, `mitigation`) names, built
    with its own Params, checked."""
    node = dict(getattr(cfg, key))
    cls = registry.get(node["name"])
    return cls(cfg, parse_params(cls.Params, node, key, node["name"]))
