"""Mitigations against forgetting across tasks, one file each (conf/mitigation/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedkd.mitigations.base import (
    MITIGATIONS,
    ClientExtras,
    ClientRound,
    Mitigation,
    MitigationContext,
    MitigationParams,
)

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


def build_mitigation(cfg: FedKDConfig) -> Mitigation:
    """The configured mitigation (`cfg.mitigation`), its parameters checked."""
    from fedkd.components import build_component

    return build_component(MITIGATIONS, cfg, "mitigation")


__all__ = [
    "MITIGATIONS",
    "ClientExtras",
    "ClientRound",
    "Mitigation",
    "MitigationContext",
    "MitigationParams",
    "build_mitigation",
]
