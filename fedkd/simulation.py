"""Run one experiment with Flower's simulation engine on Ray.

`run_experiment(cfg, out_dir)` validates the config, loads the data once on the
driver (so a bad dataset fails before Ray starts), writes the resolved config and
hands a ServerApp and a ClientApp, both bound to that config by closure, to
`flwr.simulation.run_simulation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from fedkd.client_store import ClientStore
from fedkd.cohort import COHORT, resolve_execution
from fedkd.compose import to_plain, validate
from fedkd.config import FedKDConfig, SimulationConfig, typed
from fedkd.data.federated import federated_data
from fedkd.errors import FedKDError
from fedkd.resources import resolve_num_gpus

log = logging.getLogger("fedkd")


class _DropFlowerNoise(logging.Filter):
    """Hide the messages every fedkd run would print and nobody can act on."""

    # (the last: the traceback Flower logs for each crash that `faults` injects on purpose)
    NOISE = ("run_simulation` function is deprecated", "DEPRECATED FEATURE", "injected crash")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def quiet_runtime_logs(verbose: bool) -> None:
    """Flower and Ray log a lot at INFO; fedkd shows their warnings and errors only.

    Flower sets its logger to DEBUG when imported, so import it first, then adjust.
    """
    for name in ("ray", "filelock", "datasets", "alembic"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    import flwr.supercore.logger  # noqa: F401

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose and not any(isinstance(f, _DropFlowerNoise) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropFlowerNoise())
        for handler in flwr_logger.handlers:
            handler.addFilter(_DropFlowerNoise())


# A directory holding any of these holds a run: fedkd-sim refuses to start another there.
RUN_FILES = ("metrics.jsonl", CHECKPOINT, "summary.json")


def refuse_existing_run(out_dir: Path, overwrite: bool) -> None:
    """A new run never silently replaces the results of another one."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not overwrite:
        raise FedKDError(
            f"{out_dir}: already holds a run ({', '.join(found)}); continue it with "
            "fedkd-resume, or replace it with output.overwrite=true"
        )


def client_state_dir(configured: str | None, out_dir: Path) -> Path:
    """The run's client store: in the run directory, or a folder of its own inside a
    configured (possibly shared) directory, so that runs never share files."""
    if not configured:
        return out_dir / "client_state"
    tag = hashlib.sha256(str(out_dir).encode()).hexdigest()[:10]
    return Path(configured).expanduser().resolve() / f"{out_dir.name}-{tag}"


def _check_resumable(out_dir: Path, plain: dict[str, Any]) -> None:
    """A checkpoint that cannot continue this run fails here, before Ray starts."""
    from fedkd.results import read_metrics
    from fedkd.server_state import check_restorable

    ckpt = load_checkpoint(out_dir, plain)
    rnd = ckpt["round"]
    try:
        rounds = [r["round"] for r in read_metrics(out_dir) if r["round"] <= rnd]
    except (OSError, KeyError, TypeError):
        rounds = None
    if rnd and rounds != list(range(1, rnd + 1)):
        raise CheckpointError(
            f"{out_dir / 'metrics.jsonl'}: rounds 1..{rnd} of the checkpoint are not all there"
        )
    check_restorable(plain, ckpt)


def prepare(cfg: DictConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Validate, resolve run-time values and load the data; returns the plain config.
    A new run refuses a directory that holds another run (unless output.overwrite)
    and starts with an empty client store of its own; a resumed one keeps it."""
    settings = validate(cfg)
    out_dir = Path(out_dir).resolve()
    plain = to_plain(cfg)
    if not resume:
        refuse_existing_run(out_dir, settings.output.overwrite)
    given, sim = settings.simulation, plain["simulation"]  # the plain one gets resolved
    sim["num_gpus"] = resolve_num_gpus(given.num_gpus, given.num_cpus)
    resolve_execution(plain)
    if resume:  # config.yaml names the store the run used
        store = Path(given.client_state_dir or out_dir / "client_state").resolve()
    else:
        store = client_state_dir(given.client_state_dir, out_dir)
    sim["client_state_dir"] = str(store)
    data = federated_data(plain)  # fails here, before any process starts, if data is wrong
    log.info("data: %s", json.dumps(data.describe()))
    if resume:
        _check_resumable(out_dir, plain)
    else:
        ClientStore(store, run_id=str(out_dir)).clear()  # no student from an earlier run
        for name in RUN_FILES:  # output.overwrite: the replaced run's results go
            (out_dir / name).unlink(missing_ok=True)
    return plain


def simulated_nodes(settings: FedKDConfig) -> int:
    """A node per client, or with cohorts `simulation.cohort_nodes` (fedkd/cohort.py)."""
    sim = settings.simulation
    return sim.cohort_nodes if sim.execution == COHORT else settings.num_clients


def backend_config(sim: SimulationConfig) -> dict[str, Any]:
    """Ray's settings for the `simulation` section (its GPU share resolved)."""
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": sim.verbose,
        "logging_level": logging.INFO if sim.verbose else logging.ERROR,
    }
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    return {
        "client_resources": {"num_cpus": sim.num_cpus, "num_gpus": float(sim.num_gpus)},
        "init_args": init_args,
    }


def run_experiment(cfg: DictConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run the configured experiment; results go to `out_dir`. Returns the summary.
    With `resume`, continue the run in `out_dir` from its checkpoint."""
    quiet_runtime_logs(bool(cfg.simulation.verbose))  # before Flower's imports log anything
    from flwr.simulation import run_simulation

    from fedkd.atomic import write_text_atomic
    from fedkd.client import build_client_app
    from fedkd.server import build_server_app

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plain = prepare(cfg, out, resume)
    if not resume:
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))
    settings = typed(plain)  # as resolved: GPU share, execution, client store
    sim = settings.simulation
    from fedkd import flower_patches

    flower_patches.configure(sim.fast_dispatch)
    # Keep Ray's current behaviour and drop its FutureWarning about changing it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=build_server_app(plain, out, resume),
        client_app=build_client_app(plain),
        num_supernodes=simulated_nodes(settings),
        backend_config=backend_config(sim),
        verbose_logging=sim.verbose,
    )
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}")
    if not sim.keep_client_state:  # this run's files only
        ClientStore(sim.client_state_dir, run_id=str(out)).remove()
    return json.loads(summary_path.read_text())
