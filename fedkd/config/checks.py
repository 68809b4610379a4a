"""The three checks every config section uses: one line naming key, value and what is allowed."""

from __future__ import annotations

from fedkd.errors import ConfigError


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def one_of(options: list[str] | tuple[str, ...]) -> str:
    return "one of " + ", ".join(sorted(options))


def at_least(section: object, prefix: str, **minimums: float) -> None:
    for key, low in minimums.items():
        value = getattr(section, key)
        kind = "an integer" if isinstance(value, int) else "a number"
        require(value >= low, f"{prefix}.{key}", value, f"{kind} >= {low:g}")
