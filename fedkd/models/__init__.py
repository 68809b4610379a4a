"""Model registry: `create_model(name, **kw)` and `list_models()`, as in timm.

Every model takes `num_classes` and `input_shape=(C, H, W)` and works for any image
size (adaptive pooling), so the same names serve Fashion-MNIST, CIFAR-10 and the
small synthetic images of the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedkd.seeding import derive_seed

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    seed: tuple[int | str, ...] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model; with `seed`, its initial weights are a pure function of it."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if seed is None:
        return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*seed))
        return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from fedkd.models import zoo  # noqa: E402,F401  (registers the zoo)

__all__ = ["count_parameters", "create_model", "list_models", "register_model"]
