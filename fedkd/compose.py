"""Composing a run from the config: `validate` (the schema's checks, then the
components built and checked against each other: strategy x mitigation x privacy),
Hydra composition outside `fedkd-sim` (`compose_config(overrides)`, what `flwr run`
apps, `fedkd-deploy` and the tests use), one-line descriptions of Hydra's errors, and
the plain (resolved, picklable) form of a config that travels to clients.

Layers, each importing only those before it: fedkd/config/ (the typed schema and
per-section checks), the components (strategies/, fedkd/mitigations/, built through
fedkd/components.py), this module (tests/test_import_graph.py checks it).
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.config import CONF_DIR, FedKDConfig, one_of, typed
from fedkd.errors import ConfigError, FedKDError


def group_options(group: str) -> list[str]:
    """The config files available in a group of conf/ (what `group=NAME` accepts)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate(cfg: DictConfig | dict[str, Any]) -> FedKDConfig:
    """Check every value Hydra's types cannot, before any data is loaded or any process
    is started; raise ConfigError on the first bad one. Returns the typed config.

    In order: a strategy and a mitigation are chosen; the `plugins` are imported (they
    may register datasets, models and partitioners the sections name); every section's
    own check; the libraries of the configured trackers (`logger`) are installed; the
    mitigation built with its Params and checked against the config; the strategy
    checked against the config and the mitigation, then built with its Params."""
    from fedkd.mitigations import build_mitigation
    from fedkd.registry import import_plugins
    from fedkd.results.trackers import check_installed
    from strategies import STRATEGIES, build_strategy

    for key in ("strategy", "mitigation"):
        missing = isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key)
        node = None if missing else cfg.get(key)
        if not isinstance(node, dict | DictConfig) or "name" not in node:
            raise ConfigError(key, node, f"a config group choice, {one_of(group_options(key))}")
    settings = typed(cfg)
    import_plugins(settings.plugins)
    settings.check()
    check_installed(settings.logger)  # a tracker's library: named before any work
    strategy_cls = STRATEGIES.get(settings.strategy["name"])
    mitigation = build_mitigation(settings)  # checks the mitigation's own Params
    mitigation.check_config(settings)
    strategy_cls.check_config(settings, type(mitigation))
    build_strategy(settings)  # checks the strategy's own Params
    return settings


def describe_hydra_error(exc: BaseException) -> str:
    """Hydra's composition errors are multi-line; condense one to a line naming the
    key, the value and what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(exc)
    # "find": `group=NAME`; "load": NAME in a list, `group=[a,NAME]`
    missing = re.search(r"Could not (?:find|load) '([^/']+)/([^']+)'", text)
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
