"""One registry style for everything a config names: models, datasets, partitioners,
strategies and mitigations.

A component registers itself where it is defined, with a decorator:

    STRATEGIES = Registry("strategy", "strategy.name", modules=("strategies",))

    @STRATEGIES.register("dsfl")
    class DSFL(SoftLabelStrategy): ...

`get(name)` imports the registry's built-in modules (every module of a package) on
first use, so registering never depends on import order and a new file in the
package needs no list edited. An unknown name fails with one line naming the key,
the value and the registered names. Code outside the package registers the same way: the config's
`plugins` list names modules that `import_plugins` imports, on the server and on
every client, before anything is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from fedkd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> components of one kind, filled by `register` decorators."""

    def __init__(self, kind: str, key: str, modules: Iterable[str] = ()) -> None:
        self.kind = kind  # "strategy"
        self.key = key  # the config key that names one: "strategy.name"
        self._modules = tuple(modules)  # define (and register) the built-ins
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register under `name` (default: the object's `__name__`)."""

        def add(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            known = self._entries.get(key)
            if known is not None and known is not obj and _origin(known) != _origin(obj):
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                _import_all(module)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise ConfigError(self.key, name, "one of " + ", ".join(self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


def _import_all(module: str) -> None:
    """Import `module` and, for a package, every module in it: a new file in the
    package registers itself with no list to edit."""
    mod = importlib.import_module(module)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
        importlib.import_module(f"{module}.{info.name}")


def _origin(obj: object) -> tuple[str, str]:
    # a module imported twice (as a script and as a module) registers an equal object
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")


def import_plugins(modules: Iterable[str]) -> None:
    """Import the config's `plugins`: modules that register their own components."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError("plugins", module, f"an importable Python module ({exc})") from None
