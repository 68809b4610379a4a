"""Ship a trained model to a device: TorchScript, ONNX, and int8 ONNX.

A client's student comes from the run's client store, the server model from its
checkpoint (read by its weights-only loader: run directories are shared). Every
export is checked against PyTorch: the ONNX model's logits from onnxruntime must
match within `tolerance`, and the accuracy of each format on the test split is
measured, so the accuracy change of int8 quantization is a number.
Inputs are normalized images (uint8 / 255, minus `mean`, over `std`, per channel),
written to `model.json` beside the models.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fedkd.checkpoint import CHECKPOINT, read_checkpoint
from fedkd.client_store import ClientStore
from fedkd.data.federated import FederatedData, federated_data
from fedkd.errors import FedKDError
from fedkd.models import create_model

TOLERANCE = 1e-4


class ExportError(FedKDError):
    """A run directory or model that cannot be exported."""


@dataclass
class Exported:
    files: dict[str, Path]
    max_abs_diff: float  # ONNX (onnxruntime) vs PyTorch logits on the test split
    accuracy: dict[str, float]  # per format, on the test split


def load_run(run_dir: Path) -> tuple[dict[str, Any], FederatedData]:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{run_dir}: not a fedkd run directory (no config.yaml)")
    cfg = yaml.safe_load(config.read_text())
    return cfg, federated_data(cfg)


def load_student(run_dir: Path, cfg: dict, data: FederatedData, partition_id: int) -> nn.Module:
    from fedkd.local_round import new_student

    store = ClientStore(cfg["simulation"]["client_state_dir"] or run_dir / "client_state")
    state = store.load(partition_id)
    if state is None or "model" not in state:
        raise ExportError(
            f"{run_dir}: no saved student for partition {partition_id} "
            "(was it ever sampled? is simulation.keep_client_state true?)"
        )
    model = new_student(cfg, data, partition_id)
    _load_weights(model, state["model"], store.path(partition_id))
    return model.eval()


def _load_weights(model: nn.Module, weights: Any, path: Path) -> None:
    """Saved weights that do not fit the run's model are an error naming the file."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"{path}: saved weights do not fit the run's model ({first})") from None


def load_server_model(run_dir: Path, cfg: dict, data: FederatedData) -> nn.Module:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ExportError(f"{path}: no checkpoint, so no server model to export")
    ckpt = read_checkpoint(path)  # weights only: a shared run directory may be hostile
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: not a fedkd checkpoint (no server state)")
    weights = state.get("teacher") or state.get("model")
    if weights is None:
        raise ExportError(f"{path}: this strategy has no server model")
    is_teacher = "teacher" in state
    name = cfg["model"]["teacher"] if is_teacher else cfg["model"]["student"]
    kwargs = cfg["model"]["teacher_kwargs" if is_teacher else "student_kwargs"]
    model = create_model(
        name, num_classes=data.num_classes, input_shape=data.input_shape, seed=(0,), **kwargs
    )
    _load_weights(model, weights, path)
    return model.eval()


def _logits(fn, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def export_model(model: nn.Module, data: FederatedData, out_dir: Path, name: str) -> Exported:
    """Write NAME.pt (TorchScript), NAME.onnx and NAME.int8.onnx; check and score them."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = data.task_tests[0]
    for extra in data.task_tests[1:]:
        x, y = torch.cat([x, extra[0]]), torch.cat([y, extra[1]])
    example = x[:8]
    files = {
        "torchscript": out_dir / f"{name}.pt",
        "onnx": out_dir / f"{name}.onnx",
        "onnx-int8": out_dir / f"{name}.int8.onnx",
    }
    with torch.no_grad():
        torch.jit.trace(model, example).save(str(files["torchscript"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(files["onnx"]),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                verbose=False,
            )
    quantize_dynamic(str(files["onnx"]), str(files["onnx-int8"]), weight_type=QuantType.QInt8)

    def session(path: Path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda xb: s.run(None, {s.get_inputs()[0].name: xb.numpy()})[0]

    scripted = torch.jit.load(str(files["torchscript"]))
    with torch.no_grad():
        logits = {
            "pytorch": _logits(lambda xb: model(xb).numpy(), x),
            "torchscript": _logits(lambda xb: scripted(xb).numpy(), x),
            "onnx": _logits(session(files["onnx"]), x),
            "onnx-int8": _logits(session(files["onnx-int8"]), x),
        }
    labels = y.numpy()
    accuracy = {k: float((v.argmax(1) == labels).mean()) for k, v in logits.items()}
    diff = float(np.abs(logits["onnx"] - logits["pytorch"]).max())
    meta = {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "mean": data._mean.flatten().tolist(),
        "std": data._std.flatten().tolist(),
        "input": "float32 (batch, C, H, W): uint8 / 255, minus mean, over std, per channel",
        "max_abs_diff_onnx_vs_pytorch": diff,
        "test_accuracy": accuracy,
        "test_samples": len(labels),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Exported(files, diff, accuracy)
