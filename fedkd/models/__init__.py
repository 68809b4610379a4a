"""Model registry: `create_model(name, **kw)` and `list_models()`, as in timm.

Every model takes `num_classes` and `input_shape=(C, H, W)` and works for any image
size (adaptive pooling), so the same names serve Fashion-MNIST, CIFAR-10 and the
small synthetic images of the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.registry import Registry
from fedkd.seeding import derive_seed

# builders are registered under their function name; the zoo is imported on first use
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", "model.student", modules=("fedkd.models.zoo",)
)

register_model = MODELS.register()  # `@register_model`, as a bare decorator


def list_models() -> list[str]:
    return MODELS.names()


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    seed: tuple[int | str, ...] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model; with `seed`, its initial weights are a pure function of it."""
    build = MODELS.get(name)  # ConfigError naming the registered models
    if seed is None:
        return build(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*seed))
        return build(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


def with_activation(model: nn.Module, name: str | None) -> nn.Module:
    """`model` with every ReLU module replaced by `name` (None: unchanged). DP-SGD
    learns better with a bounded activation (Papernot et al., AAAI 2021)."""
    if name is None:
        return model
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            "privacy.activation", name, "null for models with BatchNorm (their ReLUs are inline)"
        )
    for parent in list(model.modules()):
        for child, module in parent.named_children():
            if isinstance(module, nn.ReLU):
                setattr(parent, child, {"tanh": nn.Tanh}[name]())
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
    "with_activation",
]
