"""`fedkd-sim`: compose the Hydra config and run it on Flower's simulation engine.

    fedkd-sim                                   # the default experiment
    fedkd-sim strategy=fedmd rounds=5           # any override
    fedkd-sim -m strategy=dsfl,fedavg seed=0,1  # a sweep (Hydra multirun)

Results land in Hydra's run directory: config.yaml, metrics.jsonl, summary.json, plots/
(and what the trackers of `logger=...` write: docs/tracking.md).
A directory that already holds a run is refused (exit 2) unless output.overwrite=true;
`fedkd-resume DIR` continues a run instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedkd.config import CONF_DIR  # importing it registers the schema with Hydra
from fedkd.errors import FedKDError
from simulations.cli import fail, run_cli

PROG = "fedkd-sim"


# Hydra's own files, written into the run directory before the job starts
HYDRA_FILES = (".hydra",)


def _held(run_dir: Path) -> set[str]:
    """What the run directory holds apart from Hydra's own files (.hydra/, *.log)."""
    if not run_dir.is_dir():
        return set()
    return {p.name for p in run_dir.iterdir() if p.name not in HYDRA_FILES and p.suffix != ".log"}


def _discard_if_empty(run_dir: Path, before: set[str]) -> None:
    """After a user error, leave no run directory that could pass for a result; a
    directory that held anything before this job (`before`) is never deleted."""
    if not run_dir.is_dir() or before:
        return
    bookkeeping = {"config.yaml", "client_state"}
    if not _held(run_dir) - bookkeeping:
        shutil.rmtree(run_dir, ignore_errors=True)


def _refuse_existing_run(argv: list[str]) -> None:
    """`hydra.run.dir=DIR` naming a directory that holds a run: refuse before Hydra
    writes its .hydra/ files and log there (run_experiment checks again, for every
    other way of reaching such a directory)."""
    from fedkd.simulation import RUN_FILES, refuse_existing_run

    if any(a.startswith("-") for a in argv):  # --multirun, --cfg, -cn ...: Hydra decides
        return
    dirs = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not dirs or "${" in dirs[-1]:
        return
    run_dir = Path(dirs[-1]).expanduser().resolve()
    if not any((run_dir / name).exists() for name in RUN_FILES):
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            overwrite = bool(compose("config", overrides=argv).output.overwrite)
    except Exception:  # a bad override: Hydra reports it in its own words
        return
    refuse_existing_run(run_dir, overwrite)


def _sweep_trackers(cfg: DictConfig) -> None:
    """A multirun's jobs share one MLflow store, in the sweep directory, and each
    job's MLflow run is named after its subdir (docs/tracking.md). Both land in the
    job's config.yaml, so fedkd-resume finds them again."""
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    mlflow = cfg.logger.mlflow
    if hydra_cfg.mode != RunMode.MULTIRUN or not mlflow.enabled:
        return
    if mlflow.tracking_uri is None:
        mlflow.tracking_uri = f"sqlite:///{Path(hydra_cfg.sweep.dir).resolve() / 'mlflow.db'}"
    if mlflow.run_name is None:
        mlflow.run_name = str(hydra_cfg.sweep.subdir)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from fedkd.simulation import run_experiment

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    before = _held(run_dir)
    try:
        _sweep_trackers(cfg)
        summary = run_experiment(cfg, run_dir)
    except FedKDError as exc:
        # Exit here: Hydra would print its own "Error executing job" line first.
        _discard_if_empty(run_dir, before)
        fail(PROG, str(exc))
    return summary.get("teacher_accuracy")  # what a Hydra sweeper would optimise


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # we format user errors ourselves
    run_cli(PROG, lambda: _refuse_existing_run(sys.argv[1:]))
    run_cli(PROG, _hydra_main)


if __name__ == "__main__":
    main()
