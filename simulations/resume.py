"""`fedkd-resume DIR`: continue a run that was killed, from its last checkpoint.

    fedkd-sim rounds=50 hydra.run.dir=runs/long    # killed in round 31
    fedkd-resume runs/long                         # plays rounds 31..50

The run directory's `config.yaml` is the configuration (nothing can be overridden:
the resumed rounds must be the rounds the run would have played). `checkpoint.pt`
must come from that configuration. Rows of `metrics.jsonl` after the checkpoint's
round are dropped and played again; the finished run's metrics equal those of a run
that was never interrupted.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedkd.errors import FedKDError
from simulations.cli import run_cli

PROG = "fedkd-resume"


def resume(run_dir: str | Path) -> dict:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fedkd.config import FedKDConfig
    from fedkd.simulation import run_experiment

    run = Path(run_dir)
    config = run / "config.yaml"
    if not config.is_file():
        raise FedKDError(f"{run}: not a fedkd run directory (no config.yaml)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(FedKDConfig), OmegaConf.load(config))
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FedKDError(f"{config}: not a valid fedkd config ({first})") from None
    return run_experiment(cfg, run, resume=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the directory of the interrupted run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    run_cli(PROG, lambda: resume(args.run_dir))


if __name__ == "__main__":
    main()
