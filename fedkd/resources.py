"""Compute resources: client resources for Ray, torch threads and devices."""

from __future__ import annotations

import os
from typing import Any


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU run
        return 0


def resolve_num_gpus(num_gpus: Any, num_cpus: int) -> float:
    """GPUs per client. "auto": every CPU slot gets an equal share of the visible GPUs.

    Fractions only limit how many actors share a GPU (Ray does not cap memory).
    """
    if num_gpus != "auto":
        return float(num_gpus)
    gpus = visible_gpus()
    if gpus == 0:
        return 0.0
    slots = max(1, (os.cpu_count() or 1) // max(1, num_cpus))
    return round(gpus / max(slots, gpus), 4)


def client_device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and visible_gpus() > 0 else "cpu"


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False
