"""What `fedkd-bench` records beside its timings: the peak memory of the simulator's
process tree, the student's parameter count and the machine it ran on (the context
a result JSON needs to be compared with another)."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
from datetime import date
from typing import Any

from fedkd.results.provenance import cpu_model


class TreeRSS:
    """Peak resident memory of a process and all its descendants, sampled."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            with contextlib.suppress(psutil.Error):  # a process may exit meanwhile
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def student_parameters(cfg: Any) -> int:
    """The student's parameter count: what the bytes on the wire are compared with."""
    from fedkd.data.datasets import num_classes_of
    from fedkd.models import create_model

    shape = (3, 32, 32) if cfg.dataset.name == "cifar10" else (1, 28, 28)
    if cfg.dataset.name == "synthetic":
        syn = cfg.dataset.synthetic
        shape = (syn.channels, syn.image_size, syn.image_size)
    model = create_model(
        cfg.model.student, num_classes=num_classes_of(cfg.dataset), input_shape=shape, seed=(0,)
    )
    return sum(p.numel() for p in model.parameters())


def machine() -> dict[str, Any]:
    """The CPU, core count, library versions and date of a measurement: timings
    compare only between results with the same."""
    import flwr
    import ray
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "date": date.today().isoformat(),
    }
