"""Where a result came from: the code's commit and the machine's CPU.

Results are bitwise reproducible on one machine, but another CPU (or torch's
kernels for it) moves them in the 8th digit, which compounds over rounds
(docs/getting-started.md, "Determinism"); a table of numbers therefore names both.
`summary.json` carries `provenance()`; `fedkd-report` and `fedkd-bench` print it
beside their tables.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout fedkd runs from


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it; None
    outside a git checkout (an installed wheel)."""
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The commit, the CPU and the kernels torch picked for it."""
    import torch

    return {
        "commit": commit(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
