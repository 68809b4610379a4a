"""Experiment trackers (logger=tensorboard / mlflow / csv, issue 32): what each one
holds after a real fedkd-sim run, read back with the trackers' own readers, against
metrics.jsonl; a sweep as one MLflow experiment; bad names and missing libraries as
one line; a failing tracker that loses none of the run's files; resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkd.errors import FedKDError
from fedkd.results import TIMING_FIELDS, RunRecorder, read_metrics
from fedkd.results.trackers import MissingExtra, check_installed
from fedkd.results.trackers.fanout import config_params, logger_settings, round_metrics
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
SMALL = (*TINY, "output.progress=false")  # conftest's tiny setting: about 15 s end to end


def fedkd_sim(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulations.run", *args]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_sim(run_dir: Path, *args: str) -> list[dict]:
    proc = fedkd_sim(*SMALL, *args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracker" not in proc.stderr, proc.stderr[-3000:]  # no tracker failed
    return read_metrics(run_dir)


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def mlflow_runs(db: Path, experiment: str = "fedkd") -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client, client.search_runs([found.experiment_id], order_by=["attributes.run_name"])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------ real runs (Ray)
@pytest.mark.ray
def test_tensorboard_events_hold_every_rounds_metrics(tmp_path):
    rows = run_sim(tmp_path / "run", "logger=tensorboard")
    scalars = tb_scalars(tmp_path / "run" / "tensorboard")
    want = [(r["round"], r["teacher_accuracy"]) for r in rows]
    assert [s for s, _ in scalars["teacher_accuracy"]] == [1, 2]
    assert scalars["teacher_accuracy"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in want]
    for key in ("client_accuracy_mean", "client_accuracy_min", "client_accuracy_max"):
        assert scalars[key] == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    for key in ("bytes_up", "bytes_down"):  # round 1 downloads nothing: 0, still logged
        assert [v for _, v in scalars[key]] == [float(r[key]) for r in rows]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"plots/accuracy", "plots/bytes"} <= set(acc.Tags()["images"])
    assert {"config/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| strategy.name | dsfl |" in config
    assert "| train.lr | 0.01 |" in config


@pytest.mark.ray
def test_mlflow_run_holds_metrics_params_and_artifacts(tmp_path):
    rows = run_sim(tmp_path / "run", "logger=mlflow")
    assert not (ROOT / "mlruns").exists() and not (ROOT / "mlartifacts").exists()
    client, runs = mlflow_runs(tmp_path / "mlflow.db")  # beside the run directory
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["strategy.name"] == "dsfl"
    assert params["train.lr"] == "0.01"
    assert params["rounds"] == "2" and params["seed"] == "0"
    assert params["logger.mlflow.enabled"] == "True"
    want = [(r["round"], pytest.approx(r["teacher_accuracy"], rel=1e-12)) for r in rows]
    assert history(client, run.info.run_id, "teacher_accuracy") == want
    for key in ("client_accuracy_mean", "bytes_up", "bytes_down"):
        assert history(client, run.info.run_id, key) == [(r["round"], r[key]) for r in rows]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"plots", "summary.json"}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/accuracy.png", "plots/bytes.png"}
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in cwd


@pytest.mark.slow  # in CI through make test-slow; keeps the default suite short
@pytest.mark.ray
def test_csv_and_combined_trackers(tmp_path):
    run_dir = tmp_path / "run"
    rows = run_sim(run_dir, "logger=[tensorboard,mlflow,csv]")
    with (run_dir / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["round"]) for r in table] == [r["round"] for r in rows]
    for got, row in zip(table, rows, strict=True):
        for key, value in round_metrics(row).items():
            assert float(got[key]) == pytest.approx(value, rel=1e-12), key
    assert "wall_seconds" in table[0] and "bytes_up" in table[0]
    assert [s for s, _ in tb_scalars(run_dir / "tensorboard")["teacher_accuracy"]] == [1, 2]
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1
    assert [s for s, _ in history(client, runs[0].info.run_id, "teacher_accuracy")] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "tracker_errors" not in summary
    # trackers only read: the same run without them has the same metrics
    plain = run_sim(tmp_path / "plain")

    def results(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    assert results(rows) == results(plain)


@pytest.mark.ray
@pytest.mark.slow  # two jobs, each starting Ray: about 60 s
def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = fedkd_sim(
        "-m", *SMALL, "logger=mlflow", "seed=0,1", f"hydra.sweep.dir={sweep}", timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(sweep / "mlflow.db")  # the sweep's store
    assert [r.info.run_name for r in runs] == ["0_dsfl_seed0", "1_dsfl_seed1"]
    assert [r.data.params["seed"] for r in runs] == ["0", "1"]
    for run in runs:
        saved = yaml.safe_load((sweep / run.info.run_name / "config.yaml").read_text())
        assert saved["logger"]["mlflow"]["tracking_uri"] == f"sqlite:///{sweep / 'mlflow.db'}"
        assert saved["logger"]["mlflow"]["run_name"] == run.info.run_name  # for fedkd-resume
        rows = read_metrics(sweep / run.info.run_name)
        want = [(r["round"], pytest.approx(r["teacher_accuracy"], rel=1e-12)) for r in rows]
        assert history(client, run.info.run_id, "teacher_accuracy") == want
    # ... and no other experiment than MLflow's own empty Default
    assert {e.name for e in client.search_experiments()} == {"Default", "fedkd"}
    # fedkd-report reads the sweep as before: the artifact copies are no extra runs
    report = subprocess.run(
        [sys.executable, "-m", "simulations.report", str(sweep), "--out", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "| dsfl | 2 |" in report.stdout


# ------------------------------------------------------------------ user errors
@pytest.mark.parametrize("choice", ["logger=wandb", "logger=[tensorboard,wandb]"])
def test_an_unknown_logger_is_one_line_naming_the_choices(tmp_path, choice):
    proc = fedkd_sim(choice, f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        "fedkd-sim: error: logger='wandb' is not allowed: one of csv, mlflow, none, tensorboard"
    ]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("logger.csv.filename=../out.csv", "logger.csv.filename='../out.csv' is not allowed"),
        ("logger.mlflow.experiment=' '", "logger.mlflow.experiment=' ' is not allowed"),
        ("logger.mlflow.tracking_uri=mlflow.db", "logger.mlflow.tracking_uri='mlflow.db'"),
    ],
)
def test_a_bad_logger_value_is_a_config_error(tiny_cfg, override, needle):
    from fedkd.compose import validate
    from fedkd.errors import ConfigError

    with pytest.raises(ConfigError, match="is not allowed") as err:
        validate(tiny_cfg("logger=[csv,mlflow]", override))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("choice", "module"),
    [
        ("logger=mlflow", "mlflow"),
        ("logger=mlflow", "sqlalchemy"),
        ("logger=tensorboard", "tensorboard"),
    ],
)
def test_a_missing_library_names_the_extra(tiny_cfg, monkeypatch, choice, module):
    from fedkd.compose import validate

    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails
    with pytest.raises(MissingExtra) as err:
        validate(tiny_cfg(choice))
    assert str(err.value) == (
        f"{choice} needs {module}, which is not installed: pip install 'fedkd[track]'"
    )
    validate(tiny_cfg("logger=csv"))  # csv needs nothing more; none neither
    validate(tiny_cfg())


def test_a_missing_library_stops_fedkd_sim_before_any_work(tmp_path):
    """Exit 2 and one line, before data is loaded or Ray started: no run directory."""
    run_dir = tmp_path / "run"
    code = (
        "import sys; sys.modules['mlflow'] = None; "
        "from simulations.run import main; "
        f"sys.argv = ['fedkd-sim', *{list(SMALL)!r}, 'logger=[tensorboard,mlflow]', "
        f"'hydra.run.dir={run_dir}']; main()"
    )
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "fedkd-sim: error: logger=mlflow needs mlflow, which is not installed: "
        "pip install 'fedkd[track]'"
    )
    assert not run_dir.exists()


def test_the_default_run_has_no_tracker(tiny_cfg):
    from fedkd.compose import validate

    assert validate(tiny_cfg()).logger.enabled() == []
    assert validate(tiny_cfg("logger=[tensorboard,mlflow]")).logger.enabled() == [
        "tensorboard",
        "mlflow",
    ]
    check_installed(validate(tiny_cfg("logger=[tensorboard,mlflow,csv]")).logger)


def test_a_flwr_run_may_choose_its_servers_trackers_but_a_device_records_nothing():
    """`flwr run` with overrides="logger=...": the server composes it and tracks; every
    SuperNode accepts the choice (fedkd's own logger files only) and keeps its owner's
    logger, so a device needs no tracker installed and writes no tracker files."""
    from fedkd.compose import compose_config, validate
    from fedkd.node_config import RunRefused, compose_node_config, run_overrides

    run = "logger=[tensorboard,mlflow] logger.mlflow.experiment=sweep1 rounds=2"
    server = compose_config(run)
    assert server["logger"]["tensorboard"]["enabled"] is True
    assert server["logger"]["mlflow"]["experiment"] == "sweep1"
    assert run_overrides(run) == run.split()
    device = compose_node_config(run)
    assert device["rounds"] == 2  # the run's experiment settings still apply
    assert device["logger"] == compose_config("")["logger"]  # the owner's: none
    assert validate(device).logger.enabled() == []
    with pytest.raises(RunRefused, match="'logger' names no config of fedkd's own"):
        run_overrides("logger=[tensorboard,wandb]")
    with pytest.raises(RunRefused, match="needs a plain value"):
        run_overrides("logger.mlflow.tracking_uri=${oc.env:HOME}")


# ------------------------------------------------------------------ the recorder (no Ray)
def _row(rnd: int, **extra) -> dict:
    return {
        "round": rnd,
        "teacher_accuracy": 0.1 * rnd,
        "client_accuracy_mean": 0.05 * rnd,
        "client_accuracy_min": 0.01 * rnd,
        "client_accuracy_max": 0.09 * rnd,
        "bytes_up": 1000 * rnd,
        "bytes_down": 900 * rnd,
        "clients": 3,
        "rejected": 0,
        "wall_seconds": 0.5,
        **extra,
    }


def _config(*names: str, **mlflow) -> dict:
    logger = {n: {"enabled": True} for n in names}
    if mlflow:
        logger.setdefault("mlflow", {}).update(mlflow)
    return {"seed": 3, "train": {"lr": 0.05, "epochs": 1}, "plugins": [], "logger": logger}


def test_round_metrics_are_the_numeric_fields_lists_per_task():
    row = _row(
        4,
        task=1,
        task_accuracy=[0.5, None, 0.25],
        accuracy_matrix=[[0.5, None], [0.4, 0.3]],
        forgetting=0.1,
        bwt=None,
        epsilon=2.5,
        teacher_loss=float("nan"),
        strategy="dsfl",
        late=True,
    )
    got = round_metrics(row)
    assert got["task_accuracy/1"] == 0.5 and got["task_accuracy/3"] == 0.25
    assert "task_accuracy/2" not in got  # no value for it yet
    assert got["forgetting"] == 0.1 and got["epsilon"] == 2.5 and got["task"] == 1
    assert not {"round", "bwt", "teacher_loss", "strategy", "late"} & set(got)
    assert not any(k.startswith("accuracy_matrix") for k in got)  # plots, summary.json
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in got.values())


def test_config_params_are_flat_dotted_keys():
    params = config_params({"train": {"lr": 0.01}, "plugins": [], "a": {"b": {"c": None}}})
    assert params == {"train.lr": 0.01, "plugins": "[]", "a.b.c": "null"}
    assert logger_settings({}).enabled() == []


def _record(out: Path, config: dict, rounds: range, resume_round: int = 0, finish=True):
    recorder = RunRecorder(out, {"strategy": "dsfl"}, resume_round=resume_round, config=config)
    for rnd in rounds:
        recorder.log_round(_row(rnd))
    return recorder.finish() if finish else None


def test_a_failing_tracker_loses_none_of_the_runs_files(tmp_path, monkeypatch, caplog):
    """A full disk under the CSV file in round 2, a TensorBoard that fails at the end:
    metrics.jsonl and summary.json are what they are without trackers, the failures
    are in the log and in summary.json, MLflow still got everything."""
    from fedkd.results.trackers.csv_tracker import CsvTracker
    from fedkd.results.trackers.tensorboard_tracker import TensorBoardTracker

    write = CsvTracker._write

    def full_disk(self):
        if len(self.rows) == 2:
            raise OSError(28, "No space left on device")
        write(self)

    def broken(self, run_dir):
        raise RuntimeError("event file gone")

    monkeypatch.setattr(CsvTracker, "_write", full_disk)
    monkeypatch.setattr(TensorBoardTracker, "finish", broken)
    plain = tmp_path / "plain"
    _record(plain, {}, range(1, 4))
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="fedkd.trackers"):
        summary = _record(out, _config("csv", "tensorboard", "mlflow"), range(1, 4))
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    strip = ("elapsed_seconds",)
    got = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(out)]
    assert got == [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(plain)]
    errors = json.loads((out / "summary.json").read_text())["tracker_errors"]
    assert errors == summary["tracker_errors"]
    assert errors["csv"] == "failed in round 2: OSError: [Errno 28] No space left on device"
    assert errors["tensorboard"] == "failed at the end: RuntimeError: event file gone"
    assert "tracker csv failed in round 2" in caplog.text
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header, round 1
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert [s for s, _ in history(client, runs[0].info.run_id, "teacher_accuracy")] == [1, 2, 3]
    assert runs[0].info.status == "FINISHED"


def test_a_store_that_cannot_open_is_reported_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'sub' / 'mlflow.db'}"
    summary = _record(tmp_path / "run", _config("mlflow", "csv", tracking_uri=uri), range(1, 3))
    assert summary["tracker_errors"]["mlflow"].startswith("failed at the start: ")
    assert summary["rounds"] == 2
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_resume_continues_the_same_mlflow_run_and_tensorboard_dir(tmp_path):
    """Killed after round 3 with the checkpoint at round 2: the resumed recorder plays
    rounds 3-4. TensorBoard and the CSV hold each round once; MLflow goes on in the
    same run (round 3 logged twice, same values)."""
    out = tmp_path / "run"
    config = _config("tensorboard", "mlflow", "csv")
    _record(out, config, range(1, 4), finish=False)  # the process dies here
    summary = _record(out, config, range(3, 5), resume_round=2)
    assert summary["rounds"] == 4 and "tracker_errors" not in summary
    scalars = tb_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["teacher_accuracy"]] == [1, 2, 3, 4]
    with (out / "metrics.csv").open() as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [s for s, _ in history(client, runs[0].info.run_id, "teacher_accuracy")]
    assert steps == [1, 2, 3, 3, 4]
    assert runs[0].data.params["train.lr"] == "0.05"


def test_a_new_run_over_an_old_one_starts_clean_tensorboard_events(tmp_path):
    out = tmp_path / "run"
    _record(out, _config("tensorboard"), range(1, 4))
    _record(out, _config("tensorboard"), range(1, 3))  # output.overwrite=true
    assert [s for s, _ in tb_scalars(out / "tensorboard")["teacher_accuracy"]] == [1, 2]


def test_missing_extra_is_a_user_error():
    assert issubclass(MissingExtra, FedKDError)


def test_a_link_planted_at_the_tensorboard_folder_is_not_written_through(tmp_path):
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "events.out.tfevents.1.keep").write_text("not the run's")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").symlink_to(victim)
    summary = _record(tmp_path / "run", _config("tensorboard", "csv"), range(1, 3))
    assert summary["tracker_errors"]["tensorboard"].startswith("failed at the start: Symlink")
    assert [p.name for p in victim.iterdir()] == ["events.out.tfevents.1.keep"]
    assert summary["rounds"] == 2
