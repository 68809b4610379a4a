"""`logger=tensorboard`: event files in <run dir>/tensorboard, so `tensorboard --logdir`
on a sweep's directory (or outputs/) shows each job as a run.

Scalars: every round's numeric metrics under their metrics.jsonl names, step = round.
Text: `config` (the resolved config, flat) and `summary`. Images: plots/*.png.
HParams: the flat config with the final accuracies. A resumed run writes into the
same directory and purges what the earlier process logged after the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedkd.atomic import make_dir
from fedkd.config import LoggerConfig
from fedkd.results.trackers import TRACKERS, RunInfo
from fedkd.results.trackers.fanout import is_number

FINAL = ("teacher_accuracy", "client_accuracy_mean", "best_teacher_accuracy", "epsilon")


def _table(params: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
    return "| key | value |\n|---|---|\n" + rows


def _rgb(png: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    def __init__(self, run: RunInfo) -> None:
        self.log_dir = run.run_dir / "tensorboard"
        self.resume_round = run.resume_round
        self.step = run.resume_round
        self.params: dict[str, Any] = {}
        self.writer: Any = None

    @staticmethod
    def requires(settings: LoggerConfig) -> tuple[str, ...]:
        return ("tensorboard",)

    def start(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.params = params
        make_dir(self.log_dir)  # a link planted there is refused, never written through
        if not self.resume_round:  # output.overwrite: the replaced run's events go
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        purge = self.resume_round + 1 if self.resume_round else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        if not self.resume_round:
            self.writer.add_text("config", _table(params), 0)
            self.writer.flush()

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()  # a killed run keeps every finished round
        self.step = step

    def finish(self, run_dir: Path) -> None:
        summary = json.loads((run_dir / "summary.json").read_text())
        for png in sorted((run_dir / "plots").glob("*.png")):
            self.writer.add_image(f"plots/{png.stem}", _rgb(png), self.step, dataformats="HWC")
        text = json.dumps(summary, indent=2, sort_keys=True)
        self.writer.add_text("summary", f"```\n{text}\n```", self.step)
        final = {f"hparam/{k}": float(summary[k]) for k in FINAL if is_number(summary.get(k))}
        # the HParams dashboard: the flat config (str, int, float, bool) and the finals
        self.writer.add_hparams(self.params, final, run_name=".", global_step=self.step)
        self.writer.close()
