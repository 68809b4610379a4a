"""A device's config is its owner's: what a run may set on a SuperNode, and how the
node composes the config it runs (deployment only).

The run config's `overrides` come from whoever submits the run. Executed as Hydra
overrides they could load any YAML file on the device (`hydra.searchpath`), read its
environment (`${oc.env:...}`), import a module (`plugins`), point its reads and
writes anywhere (`dataset.root`, `dataset.path`, state folders) or make it sleep
(`faults.*`). So a node takes from the run only plain `key=value` experiment
settings from an allow-list (`RUN_KEYS`, `RUN_GROUPS`; the server-only `SERVER_KEYS`
are taken for the server and replaced by the owner's on the device), and composes
its config from fedkd's defaults, then the run's settings, then its owner's file
(node config `config=PATH`), which wins. The device-owned keys (`DEVICE_KEYS`)
always come from the owner, whatever a shipped experiment file says. Every refusal
names the key, never a value read on the device.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedkd.errors import FedKDError

# config groups a run may choose (the options are fedkd's own files in conf/)
RUN_GROUPS = (
    "strategy",
    "experiment",
    "dataset",
    "partition",
    "model",
    "lifelong",
    "mitigation",
    "privacy",
)
# keys (and sections, ending in ".") a run may set
RUN_KEYS = (
    "seed",
    "rounds",
    "num_clients",
    "clients_per_round",
    "strategy.",
    "train.",
    "distill.",
    "proxy.",
    "eval.",
    "partition.",
    "model.",
    "lifelong.",
    "mitigation.",
    "privacy.",
    "dataset.",
    "output.",  # the server's results (plots, progress, checkpoints): unused on a device
    # the server's own timing: accepted, and on the device the owner's (unused there)
    "simulation.register_timeout",
    "simulation.round_timeout",
    "simulation.fast_dispatch",
    "simulation.verbose",
)
# what only the device's owner decides: files, imports, resources, injected faults
DEVICE_KEYS = (
    "plugins",
    "faults",
    "simulation",
    "dataset.root",
    "dataset.download",
    "dataset.path",  # dataset=hf / folder: a directory or hub name read on the device
)
# the server's own record (experiment trackers): a run may choose them for its server,
# a device records nothing and keeps its owner's (so it needs no tracker installed)
SERVER_KEYS = ("logger",)

_KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", re.ASCII)
_TOKEN = r"[A-Za-z0-9_.+\-]*"
_VALUE = re.compile(rf"{_TOKEN}|\[{_TOKEN}(,{_TOKEN})*\]", re.ASCII)
MAX_OVERRIDES = 64


class RunRefused(FedKDError):
    """A run a node will not take part in. `str()` is what the server may see (keys
    and the server's own values); `local` adds what only the device's log gets."""

    def __init__(self, public: str, local: str = "") -> None:
        super().__init__(public)
        self.local = local or public


def _refuse(key: str, why: str) -> RunRefused:
    return RunRefused(f"this node refuses the run config: {key[:60]!r} {why}")


def run_overrides(text: Any) -> list[str]:
    """The run's `overrides`, each checked to be a plain allowed `key=value`."""
    if not isinstance(text, str):
        raise _refuse("overrides", "must be a string of key=value settings")
    try:
        items = shlex.split(text)
    except ValueError:
        raise _refuse("overrides", "cannot be split into key=value settings") from None
    if len(items) > MAX_OVERRIDES:
        raise _refuse("overrides", f"holds more than {MAX_OVERRIDES} settings")
    for item in items:
        key, sep, value = item.partition("=")
        _check_override(key, sep, value)
    return items


def _check_override(key: str, sep: str, value: str) -> None:
    if not sep or not _KEY.fullmatch(key):
        raise _refuse(key, "is not a plain key=value setting (no +, ~, @ or hydra syntax)")
    if key == "hydra" or key.startswith("hydra."):
        raise _refuse(key, "may not be set by a run (Hydra's own settings)")
    server = any(key == k or key.startswith(k + ".") for k in SERVER_KEYS)
    owners = any(key == k or key.startswith(k + ".") for k in DEVICE_KEYS)
    if owners and key not in RUN_KEYS:
        raise _refuse(key, "is the device owner's to set, not the run's")
    allowed = (
        server
        or key in RUN_GROUPS
        or key in RUN_KEYS
        or key.startswith(tuple(k for k in RUN_KEYS if k.endswith(".")))
    )
    if not allowed:
        raise _refuse(key, "is not a setting a run may choose on a device")
    if not _VALUE.fullmatch(value):
        raise _refuse(key, "needs a plain value (no interpolation, quotes or functions)")
    if key in RUN_GROUPS or key in SERVER_KEYS:
        _check_group_choice(key, value)


def _check_group_choice(key: str, value: str) -> None:
    """`value` (one option, or a list of them) names only fedkd's own files of `key`."""
    from fedkd.compose import group_options

    choices = value.strip("[]").split(",") if value.startswith("[") else [value]
    if not all(choice in group_options(key) for choice in choices):
        raise _refuse(key, "names no config of fedkd's own")


def owner_config(path: str) -> tuple[list[str], dict[str, Any]]:
    """The owner's file (node config `config=PATH`): a YAML mapping merged over
    everything else, with an optional `overrides:` list of Hydra overrides (group
    choices such as `dataset=cifar10`) applied before the run's settings."""
    if not path:
        return [], {}
    where = Path(path).expanduser()
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(where), resolve=True)
    except Exception as exc:  # unreadable, not YAML, a bad interpolation
        raise RunRefused(
            "this node cannot read its own config file (node config config=...)",
            f"node config config={str(where)!r}: {str(exc).splitlines()[0][:200]}",
        ) from None
    if not isinstance(loaded, dict):
        raise RunRefused(
            "this node's own config file is not a mapping",
            f"node config config={str(where)!r} must hold a YAML mapping",
        )
    overrides = loaded.pop("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise RunRefused(
            "this node's own config file has a malformed overrides list",
            f"{where}: overrides must be a list of strings",
        )
    return overrides, loaded


def compose_node_config(overrides: Any, config_file: str = "") -> dict[str, Any]:
    """The plain config this node runs: fedkd's defaults + the owner's group choices
    + the run's allowed settings, then the owner's mapping; the device-owned keys
    are the owner's alone. RunRefused, naming keys only, on any failure."""
    from fedkd.compose import compose_config

    run = run_overrides(overrides)
    own_overrides, own = owner_config(config_file)
    try:
        base = compose_config(own_overrides, merge=own)  # the owner's config alone
        cfg = compose_config([*own_overrides, *run], merge=own, keep=_device_part(base))
    except FedKDError as exc:
        key = getattr(exc, "key", None) or "the composed config"
        raise RunRefused(
            f"this node refuses the run config: {str(key)[:60]!r} is not valid on this node",
            str(exc),
        ) from None
    return cfg


def _device_part(plain: dict[str, Any]) -> dict[str, Any]:
    """The DEVICE_KEYS and SERVER_KEYS of a plain config, as a nested mapping to merge
    over another."""
    out: dict[str, Any] = {}
    for dotted in (*DEVICE_KEYS, *SERVER_KEYS):
        node, parts = plain, dotted.split(".")
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    return out
