"""`fedkd-sim`: compose the Hydra config and run it on Flower's simulation engine.

    fedkd-sim                                   # the default experiment
    fedkd-sim strategy=fedmd rounds=5           # any override
    fedkd-sim -m strategy=dsfl,fedavg seed=0,1  # a sweep (Hydra multirun)

Results land in Hydra's run directory: config.yaml, metrics.jsonl, summary.json, plots/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedkd.config import CONF_DIR  # importing it registers the schema with Hydra
from fedkd.errors import FedKDError
from simulations.cli import fail, run_cli

PROG = "fedkd-sim"


def _discard_if_empty(run_dir: Path) -> None:
    """After a user error, leave no run directory that could pass for a result."""
    if not run_dir.is_dir():
        return
    bookkeeping = {".hydra", "config.yaml", "client_state"}
    ours = [p for p in run_dir.iterdir() if p.name not in bookkeeping and p.suffix != ".log"]
    if not ours:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from fedkd.simulation import run_experiment

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_experiment(cfg, run_dir)
    except FedKDError as exc:
        # Exit here: Hydra would print its own "Error executing job" line first.
        _discard_if_empty(run_dir)
        fail(PROG, str(exc))
    return summary.get("teacher_accuracy")  # what a Hydra sweeper would optimise


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # we format user errors ourselves
    run_cli(PROG, _hydra_main)


if __name__ == "__main__":
    main()
