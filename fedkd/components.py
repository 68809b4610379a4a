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


def component_params(registry: Registry, cfg: FedKDConfig, key: str) -> tuple[Any, Any]:
    """The class that config node `key` (`strategy`, `mitigation`) names and its own
    Params, parsed and checked (a client builds a strategy's half from these)."""
    node = dict(getattr(cfg, key))
    cls = registry.get(node["name"])
    return cls, parse_params(cls.Params, node, key, node["name"])


def build_component(registry: Registry, cfg: FedKDConfig, key: str) -> Any:
    """The component that config node `key` names, built with its own Params."""
    cls, params = component_params(registry, cfg, key)
    return cls(cfg, params)
