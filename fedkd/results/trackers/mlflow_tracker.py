"""`logger=mlflow`: an MLflow run per job, through MlflowClient (no global active run,
so the jobs of a sweep in one process never mix).

The store: logger.mlflow.tracking_uri, by default sqlite:///<dir>/mlflow.db where
<dir> is a multirun's sweep directory (fedkd-sim sets it) or else the run
directory's parent; a sqlite store keeps artifacts in <dir>/mlartifacts. All jobs
of a sweep log to one experiment (logger.mlflow.experiment), each as a run named
logger.mlflow.run_name, by default after its run directory (the job's subdir).
Params: the resolved config, flat. Metrics: every round's numeric metrics, step =
round. Artifacts: plots/*.png and summary.json. fedkd-resume continues the run
tagged with the same run directory; the rounds it plays again are logged again at
the same steps.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from fedkd.config import LoggerConfig
from fedkd.results.trackers import TRACKERS, RunInfo

RUN_DIR_TAG = "fedkd.run_dir"
PARAM_BATCH, METRIC_BATCH, MAX_VALUE = 100, 1000, 6000


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@TRACKERS.register("mlflow")
class MLflowTracker:
    def __init__(self, run: RunInfo) -> None:
        settings = run.settings.mlflow
        default = run.run_dir.resolve().parent / "mlflow.db"
        self.uri = settings.tracking_uri or f"sqlite:///{default}"
        self.experiment = settings.experiment
        self.name = settings.run_name or run.name
        self.run_dir = str(run.run_dir.resolve())
        self.resume = run.resume_round > 0
        self.client: Any = None
        self.run_id = ""

    @staticmethod
    def requires(settings: LoggerConfig) -> tuple[str, ...]:
        uri = settings.mlflow.tracking_uri
        if uri is None or uri.startswith("sqlite:"):  # the sqlite store needs these too
            return ("mlflow", "sqlalchemy", "alembic")
        return ("mlflow",)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        db = _sqlite_path(self.uri)
        where = None
        if db is not None:  # artifacts beside the database, not in the working directory
            db.parent.mkdir(parents=True, exist_ok=True)
            where = (db.resolve().parent / "mlartifacts").as_uri()
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=where)
            except MlflowException:  # another job of the sweep made it meanwhile
                found = self.client.get_experiment_by_name(self.experiment)
        if found is None or found.lifecycle_stage != "active":
            raise RuntimeError(
                f"MLflow experiment {self.experiment!r} in {self.uri} is deleted: restore it "
                "or set logger.mlflow.experiment"
            )
        return found.experiment_id

    def _earlier_run(self, experiment_id: str) -> str | None:
        """fedkd-resume: the run this run directory logged to before."""
        if "'" in self.run_dir:
            return None
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{self.run_dir}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        with warnings.catch_warnings():  # sqlalchemy's about mlflow's store, on opening it
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment_id = self._experiment_id()
        earlier = self._earlier_run(experiment_id) if self.resume else None
        if earlier is not None:
            self.run_id = earlier
            self.client.update_run(earlier, status="RUNNING")
            return
        from fedkd.results.provenance import commit

        tags = {RUN_DIR_TAG: self.run_dir, "fedkd.commit": commit() or "unknown"}
        self.run_id = self.client.create_run(
            experiment_id, tags=tags, run_name=self.name
        ).info.run_id
        items = [Param(k, str(v)[:MAX_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRIC_BATCH])

    def finish(self, run_dir: Path) -> None:
        plots = run_dir / "plots"
        if plots.is_dir():
            self.client.log_artifacts(self.run_id, str(plots), "plots")
        self.client.log_artifact(self.run_id, str(run_dir / "summary.json"))
        self.client.set_terminated(self.run_id, "FINISHED")
