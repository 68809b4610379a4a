"""Hydra composition outside `fedkd-sim`: `compose_config(overrides)` (what `flwr run`
apps, `fedkd-deploy` and the tests use), one-line descriptions of Hydra's errors, and
the plain (resolved, picklable) form of a config that travels to clients.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.config import CONF_DIR, validate
from fedkd.errors import ConfigError, FedKDError


def group_options(group: str) -> list[str]:
    """The config files available in a group of conf/ (what `group=NAME` accepts)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def describe_hydra_error(exc: BaseException) -> str:
    """Hydra's composition errors are multi-line; condense one to a line naming the
    key, the value and what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(exc)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = group_options(group)
        if options:
            return str(ConfigError(group, value, "one of " + ", ".join(options)))
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    first = next((ln.strip() for ln in str(msg).splitlines() if ln.strip()), type(exc).__name__)
    override = re.search(r"override '?([^'\s]+)'?", text)
    if key:
        return f"{key}: {first}"
    if override and "not in struct" in text:
        return f"{override.group(1)}: unknown config key (to add a new key, prefix it with '+')"
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))
    ]
    return "; ".join(lines[:2]) if lines else first


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A resolved, picklable copy (what the ClientApp closure carries to Ray workers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose_config(
    overrides: str | list[str] = "",
    merge: dict[str, Any] | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compose conf/ with Hydra overrides (as on the fedkd-sim command line),
    validate it and return the plain config. `flwr run` apps build theirs this way;
    a device (fedkd/node_config.py) merges its owner's `merge` mapping over the
    result, and then `keep` (its device-owned keys), before validating.
    Raises FedKDError for anything Hydra or `validate` rejects."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
        for extra in (merge, keep):
            if extra:
                cfg = OmegaConf.merge(cfg, extra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedKDError(f"overrides {' '.join(args)!r}: {describe_hydra_error(exc)}") from None
    validate(cfg)
    return to_plain(cfg)
