"""`fedkd-export RUN_DIR`: a trained student (or the server model) for devices.

    fedkd-export outputs/2026-11-23/10-00-00_dsfl --client 0 --out export/
    fedkd-export outputs/2026-11-23/10-00-00_dsfl --server --out export/

Writes TorchScript (`.pt`), ONNX (`.onnx`), int8 ONNX (`.int8.onnx`, onnxruntime
dynamic quantization) and a `.json` with the input normalization and the measured
test accuracy of every format; fails (exit code 2) if onnxruntime's logits differ
from PyTorch's by more than 1e-4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.cli import run_cli

PROG = "fedkd-export"


def export(run_dir: str, client: int | None, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedkd.export import (
        TOLERANCE,
        ExportError,
        export_model,
        load_run,
        load_server_model,
        load_student,
    )

    run = Path(run_dir)
    cfg, data = load_run(run)
    if client is None:
        model, name = load_server_model(run, cfg, data), "server"
    else:
        model, name = load_student(run, cfg, data, client), f"student_{client}"
    result = export_model(model, data, Path(out), name)
    table = Table(title=f"{name}: test accuracy of each format")
    for col in ("format", "test accuracy", "file"):
        table.add_column(col)
    for fmt, acc in result.accuracy.items():
        table.add_row(fmt, f"{acc:.4f}", str(result.files.get(fmt, "-")))
    Console().print(table)
    print(f"max |onnx - pytorch| logit difference: {result.max_abs_diff:.2e}")
    if result.max_abs_diff > TOLERANCE:
        raise ExportError(
            f"onnxruntime's logits differ from PyTorch's by {result.max_abs_diff:.2e} "
            f"(> {TOLERANCE}); the ONNX model is not faithful"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", type=int, metavar="PARTITION", help="a client's student")
    who.add_argument("--server", action="store_true", help="the teacher / global model")
    parser.add_argument("--out", default="export", help="output folder (default: export)")
    args = parser.parse_args(argv)
    run_cli(PROG, lambda: export(args.run_dir, args.client, args.out))


if __name__ == "__main__":
    main()
