"""Export for devices: TorchScript and ONNX match PyTorch; int8 is measured."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from fedkd.client_store import ClientStore
from fedkd.compose import to_plain
from fedkd.data.federated import federated_data
from fedkd.errors import FedKDError
from fedkd.export import TOLERANCE, export_model, load_run, load_server_model, load_student
from fedkd.local_round import new_student
from fedkd.models import create_model
from tests.conftest import TINY, compose_cfg


@pytest.fixture
def run_dir(tmp_path):
    """A finished tiny run as fedkd-sim leaves it: config, client store, checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    plain = to_plain(compose_cfg(*TINY))
    plain["simulation"]["client_state_dir"] = str(run / "client_state")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    data = federated_data(plain)
    student = new_student(plain, data, 0)
    with torch.no_grad():  # a student that is not at its initialisation
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ClientStore(run / "client_state").save(0, {"model": student.state_dict()}, 1)
    teacher = create_model(
        plain["model"]["teacher"], num_classes=data.num_classes, input_shape=data.input_shape,
        seed=(1,),
    )  # fmt: skip
    torch.save({"state": {"teacher": teacher.state_dict()}}, run / "checkpoint.pt")
    return run


def test_exported_student_matches_pytorch(run_dir, tmp_path):
    cfg, data = load_run(run_dir)
    model = load_student(run_dir, cfg, data, 0)
    out = export_model(model, data, tmp_path / "export", "student_0")
    assert out.max_abs_diff <= TOLERANCE
    acc = out.accuracy
    assert acc["onnx"] == acc["pytorch"] == acc["torchscript"]  # same predictions
    assert 0.0 <= acc["onnx-int8"] <= 1.0
    meta = json.loads((tmp_path / "export" / "student_0.json").read_text())
    assert meta["input_shape"] == list(data.input_shape) and len(meta["mean"]) == 1
    for path in out.files.values():
        assert path.stat().st_size > 0


def test_exported_server_model_matches_pytorch(run_dir, tmp_path):
    cfg, data = load_run(run_dir)
    out = export_model(load_server_model(run_dir, cfg, data), data, tmp_path / "e", "server")
    assert out.max_abs_diff <= TOLERANCE
    assert out.accuracy["onnx"] == out.accuracy["pytorch"]


def test_missing_student_or_run_is_a_clean_error(run_dir, tmp_path):
    cfg, data = load_run(run_dir)
    with pytest.raises(FedKDError, match="no saved student for partition 2"):
        load_student(run_dir, cfg, data, 2)
    with pytest.raises(FedKDError, match="not a fedkd run directory"):
        load_run(tmp_path / "nothing")


def test_a_server_checkpoint_holding_code_is_refused_without_running_it(run_dir, tmp_path):
    from tests.test_files import Payload

    marker = tmp_path / "ran"
    torch.save({"state": {"teacher": Payload(marker)}}, run_dir / "checkpoint.pt")
    cfg, data = load_run(run_dir)
    with pytest.raises(FedKDError, match="unreadable checkpoint") as err:
        load_server_model(run_dir, cfg, data)
    assert "\n" not in str(err.value) and not marker.exists()


def test_saved_weights_that_do_not_fit_are_a_clean_error(run_dir):
    torch.save({"state": {"teacher": {"conv.weight": torch.zeros(1)}}}, run_dir / "checkpoint.pt")
    cfg, data = load_run(run_dir)
    with pytest.raises(FedKDError, match="do not fit the run's model") as err:
        load_server_model(run_dir, cfg, data)
    assert "\n" not in str(err.value)
