"""Finding finished runs, bringing older runs' configs to today's layout, and checking
that the runs of one table differ only in what is compared (which then names the rows).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkd.errors import FedKDError

# Keys that may differ between runs of one table: what is being compared, and
# where each run happened to write its files.
# (keep_client_state and verbose only decide what is left on disk or printed; the
# execution path, cohorts or a node per client, gives the same numbers.)
VARYING = (
    "strategy",
    "seed",
    "mitigation",
    "simulation.client_state_dir",
    "simulation.keep_client_state",
    "simulation.verbose",
    "simulation.execution",
    "simulation.cohort_nodes",
    "output",
    "logger",  # experiment trackers (where a copy of the metrics goes): never a result
)
# Of those, what never names a row: the seed, and what follows from the strategy name.
NOT_LABELS = (
    "seed",
    "simulation.client_state_dir",
    "simulation.keep_client_state",
    "simulation.verbose",
    "simulation.execution",
    "simulation.cohort_nodes",
    "strategy.name",
    "strategy._target_",
    "mitigation.name",  # already in the row's name
    "output",  # plots, progress display, checkpoints: never a result
    "logger",
)


class ReportError(FedKDError):
    pass


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    label_keys: tuple[str, ...] = ()  # compared settings that name the row
    # the config `strategy=<its strategy> mitigation=<its mitigation>` composes to:
    # what its strategy's and mitigation's configs set, beside their own params
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        mitigation = self.summary.get("mitigation") or "none"
        name = str(self.summary.get("strategy"))
        name = f"{name} + {mitigation}" if self.lifelong else name
        flat = _flatten(self.config)
        extras = [f"{k.split('.')[-1]}={flat[k]}" for k in self.label_keys if k in flat]
        return " ".join([name, *extras])

    @property
    def lifelong(self) -> bool:
        return (self.summary.get("num_tasks") or 1) > 1


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(paths: list[str]) -> list[Run]:
    runs = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ReportError(f"{p}: no such directory")
        for summary in sorted(root.rglob("summary.json")):
            run_dir = summary.parent
            config = run_dir / "config.yaml"
            if not config.exists():
                continue
            try:
                s = json.loads(summary.read_text())
                c = yaml.safe_load(config.read_text())
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                raise ReportError(f"{run_dir}: unreadable results ({exc})") from None
            s["bytes_total"] = (s.get("bytes_up") or 0) + (s.get("bytes_down") or 0)
            runs.append(Run(run_dir, s, upgrade_config(c)))
    if not runs:
        raise ReportError(
            "no finished runs (directories with summary.json and config.yaml) under "
            + ", ".join(paths)
        )
    fill_new_settings(runs)
    return runs


# Before mitigations had their own config group, their name and every mitigation's
# parameters sat in `lifelong`.
LEGACY_MITIGATION_KEYS = (
    "mitigation",
    "memory_weight",
    "memory_size",
    "lwf_weight",
    "review_fraction",
    "replay_size",
)


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """An older run's config.yaml in today's layout (`mitigation` group, no
    `strategy._target_`), so it groups with runs made today."""
    from dataclasses import fields

    from fedkd.errors import ConfigError
    from fedkd.mitigations import MITIGATIONS

    lifelong = config.get("lifelong") or {}
    if "mitigation" not in config and "mitigation" in lifelong:
        name = lifelong["mitigation"]
        node = {"name": name}
        try:
            params = [f.name for f in fields(MITIGATIONS.get(name).Params)]
        except ConfigError:  # a mitigation that no longer exists
            params = []
        node.update({k: lifelong[k] for k in params if k in lifelong and k != "name"})
        config["mitigation"] = node
        for key in LEGACY_MITIGATION_KEYS:
            lifelong.pop(key, None)
    (config.get("strategy") or {}).pop("_target_", None)
    return config


def fill_new_settings(runs: list[Run]) -> None:
    """A setting added to fedkd after a run was made is missing from its config.yaml:
    give it today's default for the run's strategy and mitigation (new settings
    default to the old behaviour), so old and new runs of one setting compare as one."""
    from fedkd.compose import compose_config

    defaults: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        key = (
            str(run.config.get("strategy", {}).get("name")),
            str(run.config.get("mitigation", {}).get("name", "none")),
        )
        if key not in defaults:
            try:
                defaults[key] = compose_config([f"strategy={key[0]}", f"mitigation={key[1]}"])
            except FedKDError:  # a strategy that no longer exists: leave the run as it is
                defaults[key] = {}
        _fill_missing(run.config, defaults[key])
        run.defaults = defaults[key]


def _fill_missing(config: dict[str, Any], default: dict[str, Any]) -> None:
    for key, value in default.items():
        if key not in config:
            config[key] = value
        elif isinstance(value, dict) and isinstance(config[key], dict):
            _fill_missing(config[key], value)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == x or key.startswith(x + ".") for x in prefixes)


def check_same_setting(runs: list[Run], vary: tuple[str, ...] = ()) -> None:
    """Every run must share every setting except those in VARYING and `vary`; the
    compared settings that do differ (but the seed) become part of each row's name."""
    allowed = VARYING + vary

    def setting(run: Run) -> dict[str, Any]:
        return {k: v for k, v in _flatten(run.config).items() if not _matches(k, allowed)}

    def own_default(run: Run, key: str, value: Any) -> bool:
        """The run has the value its strategy's config sets (e.g. conf/strategy/dsfl.yaml
        sets DS-FL's server step): it differs with the strategy, like its params."""
        default = _flatten(run.defaults)
        return key in default and default[key] == value

    ref = setting(runs[0])
    for run in runs[1:]:
        other = setting(run)
        for key in sorted(set(ref) | set(other)):
            mine, theirs = ref.get(key), other.get(key)
            if mine != theirs and not (
                own_default(runs[0], key, mine) and own_default(run, key, theirs)
            ):
                raise ReportError(
                    f"runs of different settings are mixed: {key} is {ref.get(key)!r} in "
                    f"{runs[0].path} but {other.get(key)!r} in {run.path} "
                    f"(compare it on purpose with --vary {key})"
                )
    # A compared setting names the rows if two runs of one strategy and mitigation
    # differ in it (others have other settings; their names tell them apart).
    flats = [
        (f"{r.summary.get('strategy')}+{r.summary.get('mitigation')}", _flatten(r.config))
        for r in runs
    ]
    keys = sorted({k for _, f in flats for k in f if _matches(k, allowed)})

    def differs(key: str) -> bool:
        seen: dict[str, set[str]] = defaultdict(set)
        for name, f in flats:
            seen[name].add(json.dumps(f.get(key)))
        return any(len(v) > 1 for v in seen.values())

    labels = tuple(k for k in keys if not _matches(k, NOT_LABELS) and differs(k))
    for run in runs:
        run.label_keys = labels
