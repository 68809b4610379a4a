"""Mitigations against forgetting across tasks, one file each (`lifelong.mitigation`)."""

from __future__ import annotations

from fedkd.mitigations.base import ClientExtras, ClientRound, Mitigation
from fedkd.mitigations.client_lwf import ClientLwF
from fedkd.mitigations.replay import Replay
from fedkd.mitigations.review import Review
from fedkd.mitigations.teacher_memory import TeacherMemory

MITIGATIONS: dict[str, type[Mitigation]] = {
    m.name: m for m in (Mitigation, TeacherMemory, ClientLwF, Review, Replay)
}


def list_mitigations() -> list[str]:
    return sorted(MITIGATIONS)


def build_mitigation(cfg: dict) -> Mitigation:
    name = (cfg.get("lifelong") or {}).get("mitigation", "none")
    return MITIGATIONS[name](cfg)


__all__ = ["ClientExtras", "ClientRound", "Mitigation", "build_mitigation", "list_mitigations"]
