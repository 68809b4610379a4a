"""Mitigations against forgetting across tasks, one file each (conf/mitigation/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedkd.mitigations.base import (
    MITIGATIONS,
    ClientExtras,
    ClientRound,
    Mitigation,
    MitigationParams,
)

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


def mitigation_class(name: str) -> type[Mitigation]:
    return MITIGATIONS.get(name)


def list_mitigations() -> list[str]:
    return MITIGATIONS.names()


def build_mitigation(cfg: FedKDConfig) -> Mitigation:
    """The configured mitigation (`cfg.mitigation`), its parameters checked."""
    from fedkd.config import parse_params

    node = dict(cfg.mitigation)
    cls = mitigation_class(node["name"])
    return cls(cfg, parse_params(cls.Params, node, "mitigation", node["name"]))


__all__ = [
    "MITIGATIONS",
    "ClientExtras",
    "ClientRound",
    "Mitigation",
    "MitigationParams",
    "build_mitigation",
    "list_mitigations",
    "mitigation_class",
]
