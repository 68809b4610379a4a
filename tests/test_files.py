"""Hostile and broken files: checkpoints load weights-only (a planted pickle never
runs), every server part's state survives that loader exactly, a damaged checkpoint
is one line and exit 2 with nothing touched, atomic writes fsync, and a SIGKILL in
the middle of a checkpoint write leaves a whole checkpoint (issue 15, "Files")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.checkpoint import CHECKPOINT, read_checkpoint
from fedkd.errors import FedKDError
from tests.conftest import TINY, compose_cfg
from tests.test_bad_files import ROOT, make_run_dir, resume_cli


def plant(marker: str) -> None:
    """What the planted pickle would run: leave a marker file."""
    Path(marker).write_text("the checkpoint ran code")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (plant, (self.marker,))


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def same(a, b) -> bool:
    """Deep equality; tensors compared exactly, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    return type(a) is type(b) and a == b


def played(tmp_path: Path, *overrides: str):
    """Two rounds of the real round loop (clients called in this process), checkpointed."""
    from fedkd.local_round import client_reply
    from fedkd.round_loop import DirectTransport, run_rounds
    from fedkd.server_state import build_server_state
    from fedkd.simulation import prepare

    out = tmp_path / "run"
    plain = prepare(compose_cfg(*TINY, *overrides), out)
    state = build_server_state(plain, "cpu")
    state.population = list(range(state.cfg.num_clients))
    rows: list[dict] = []

    class Rows:
        log_round = rows.append

    run_rounds(state, DirectTransport(lambda pid, c: client_reply(plain, pid, c)), Rows(), out)
    return plain, state, rows, out


LIFELONG = ("lifelong=class_incremental", "lifelong.num_tasks=2", "lifelong.rounds_per_task=1")


@pytest.mark.parametrize(
    "overrides",
    [
        # every part with state of its own: soft-label strategies (teacher, Adam,
        # label memory), weight strategies, the mitigations that keep server state,
        # the lifelong trackers, both privacy ledgers
        ("strategy=fedmd", "privacy=client", "strategy.label_memory=true"),
        ("strategy=feddf",),
        ("strategy=central",),
        (*LIFELONG, "mitigation=teacher_memory", "mitigation.memory_size=20", "privacy=sample"),
        (*LIFELONG, "mitigation=review"),
    ],
    ids=lambda o: "+".join(x.split("=")[1] for x in o if "." not in x.split("=")[0]),
)
def test_every_part_of_the_server_state_survives_the_weights_only_loader(tmp_path, overrides):
    from fedkd.checkpoint import load_checkpoint
    from fedkd.server_state import build_server_state

    plain, state, _, out = played(tmp_path, *overrides)
    ckpt = load_checkpoint(out, plain)  # torch.load(weights_only=True)
    assert same(ckpt, state.state_dict())
    fresh = build_server_state(plain, "cpu")
    np.random.seed(123)  # the restore must bring the RNG states back exactly
    torch.manual_seed(123)
    fresh.load_state_dict(ckpt)
    assert fresh.round == 2 and same(fresh.state_dict(), ckpt)
    draws = np.random.standard_normal(3), torch.rand(3)
    fresh.load_state_dict(ckpt)
    assert np.array_equal(draws[0], np.random.standard_normal(3))
    assert torch.equal(draws[1], torch.rand(3))


def test_numpy_rng_state_is_plain_and_exact_with_a_cached_gaussian():
    from fedkd.server_state import numpy_rng_state, set_numpy_rng_state

    np.random.seed(7)
    np.random.standard_normal()  # the legacy generator now caches the pair's second value
    saved = numpy_rng_state()
    assert saved["has_gauss"] == 1 and saved["key"].dtype == torch.uint32
    expected = np.random.standard_normal(5)
    set_numpy_rng_state(saved)
    assert np.array_equal(np.random.standard_normal(5), expected)


def server_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    """A run directory after round 1 with a real ServerState checkpoint."""
    from fedkd.checkpoint import save_checkpoint
    from fedkd.server_state import build_server_state

    run, plain = make_run_dir(tmp_path)
    state = build_server_state(plain, "cpu")
    state.round = 1
    ckpt = state.state_dict()
    save_checkpoint(run, ckpt)
    return run, ckpt


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    from fedkd.export import load_run, load_server_model
    from simulations.resume import resume

    run, ckpt = server_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    torch.save({**ckpt, "state": {**ckpt["state"], "x": Payload(marker)}}, run / CHECKPOINT)
    # the plant is live: the unsafe loader would run it
    torch.load(run / CHECKPOINT, weights_only=False)
    assert marker.exists()
    marker.unlink()

    before = snapshot(run)
    with pytest.raises(FedKDError, match=r"unreadable checkpoint .*not loaded") as err:
        resume(run)
    assert "\n" not in str(err.value)
    cfg, data = load_run(run)
    with pytest.raises(FedKDError, match="unreadable checkpoint"):  # fedkd-export --server
        load_server_model(run, cfg, data)
    proc = resume_cli(run)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and snapshot(run) == before


@pytest.mark.parametrize("case", ["truncated", "bytes-flipped", "part-misfit", "part-missing"])
def test_a_damaged_checkpoint_is_one_line_and_touches_nothing(tmp_path, case):
    from fedkd.simulation import prepare

    run, ckpt = server_checkpoint(tmp_path)
    path = run / CHECKPOINT
    data = path.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "bytes-flipped":
        mid = len(data) // 2
        path.write_bytes(
            data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
        )
    elif case == "part-misfit":  # loads, digest right, but the teacher is not this run's
        teacher = {k: torch.zeros(1) for k in ckpt["state"]["teacher"]}
        torch.save({**ckpt, "state": {**ckpt["state"], "teacher": teacher}}, path)
    else:
        torch.save({k: v for k, v in ckpt.items() if k != "privacy"}, path)
    before = snapshot(run)
    with pytest.raises(FedKDError, match="checkpoint") as err:
        prepare(compose_cfg(*TINY), run, resume=True)
    assert "\n" not in str(err.value)
    if case in ("truncated", "part-misfit"):  # and on the command line
        proc = resume_cli(run)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("fedkd-resume: error: ") and "checkpoint" in lines[0]
    assert snapshot(run) == before


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from fedkd import atomic

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_atomic(tmp_path / "f.bin", lambda f: f.write(b"data"))
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert (tmp_path / "f.bin").read_bytes() == b"data"


WRITER = """
import sys, torch
from fedkd.checkpoint import save_checkpoint
run, start = sys.argv[1], int(sys.argv[2])
for k in range(start, start + 10**6):
    save_checkpoint(run, {"round": k, "payload": torch.full((4_000_000,), float(k))})
    print(k, flush=True)
"""


def temp_files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name.startswith(f".{CHECKPOINT}-")}


def test_sigkill_during_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path):
    """A child writes checkpoints in a loop with the real save function and is killed
    five times, as soon as a write is under way (plus a random few milliseconds): the
    checkpoint is always the last one finished or the one being written, whole and
    loadable, never a torn file."""
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    start = 0
    for _ in range(5):
        cmd = [sys.executable, "-c", WRITER, str(run), str(start)]
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        done = [int(child.stdout.readline()) for _ in range(3)]  # three whole writes
        old = temp_files(run)
        deadline = time.monotonic() + 30
        while not temp_files(run) - old and time.monotonic() < deadline:
            time.sleep(0.0005)  # until the next write's temporary file exists
        time.sleep(float(rng.uniform(0.0, 0.005)))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        done += [int(line) for line in child.stdout.read().split()]
        ckpt = read_checkpoint(run / CHECKPOINT)  # never raises: the file is whole
        assert ckpt["round"] in (done[-1], done[-1] + 1)
        assert torch.equal(ckpt["payload"], torch.full((4_000_000,), float(ckpt["round"])))
        start = done[-1] + 2
    assert temp_files(run), "no kill landed in the middle of a write"


def test_a_truncated_checkpoint_after_a_kill_is_one_line_from_fedkd_resume(tmp_path):
    run, _ = server_checkpoint(tmp_path)
    (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:100])
    before = snapshot(run)
    proc = resume_cli(run)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "unreadable checkpoint" in lines[0] and snapshot(run) == before
