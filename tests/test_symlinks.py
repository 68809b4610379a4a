"""Writes into a run folder never follow a symbolic link planted there (issue 29):
a whole file replaces the link, an append or a lock file refuses it with one clear
error, and the file the link points at is never touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkd.atomic import SymlinkError
from fedkd.client_store import ClientStore
from fedkd.results import plots
from fedkd.results.recorder import RunRecorder

ROW = {"round": 1, "teacher_accuracy": 0.5, "bytes_up": 10, "bytes_down": 20, "wall_seconds": 1.0}


def plant(link: Path, tmp_path: Path, content: bytes | None = b"victim\n") -> Path:
    """A symbolic link at `link` to a victim file outside the run (missing if
    `content` is None); returns the victim's path."""
    victim = tmp_path / "elsewhere" / f"victim-{link.name}"
    victim.parent.mkdir(exist_ok=True)
    if content is not None:
        victim.write_bytes(content)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return victim


def test_a_link_at_metrics_jsonl_is_refused_and_its_target_untouched(tmp_path):
    # on the old main the round's row was appended to the victim
    run = tmp_path / "run"
    victim = plant(run / "metrics.jsonl", tmp_path)
    recorder = RunRecorder(run, {}, plots=False)  # the new file replaces the link
    assert not recorder.path.is_symlink() and victim.read_bytes() == b"victim\n"
    recorder.path.unlink()
    recorder.path.symlink_to(victim)  # planted while the run goes on
    with pytest.raises(SymlinkError, match=r"metrics\.jsonl is a symbolic link"):
        recorder.log_round(ROW)
    assert victim.read_bytes() == b"victim\n"


def test_a_link_at_config_yaml_is_replaced_not_written_through(tmp_path):
    # fedkd/app.py's and fedkd-sim's config.yaml: on the old main, Path.write_text
    # wrote through the link (and the old main had no write_text_atomic)
    from fedkd.atomic import write_text_atomic

    victim = plant(tmp_path / "run" / "config.yaml", tmp_path)
    write_text_atomic(tmp_path / "run" / "config.yaml", "seed: 0\n")
    assert victim.read_bytes() == b"victim\n"
    config = tmp_path / "run" / "config.yaml"
    assert not config.is_symlink() and config.read_text() == "seed: 0\n"


@pytest.mark.parametrize("name", ["accuracy.png", "bytes.png"])
def test_a_link_at_a_plot_is_replaced_not_written_through(tmp_path, name):
    # on the old main matplotlib's savefig overwrote the victim
    out = tmp_path / "run" / "plots"
    victim = plant(out / name, tmp_path)
    plots.plot_run([ROW], out, title="t")
    assert victim.read_bytes() == b"victim\n"
    assert not (out / name).is_symlink() and (out / name).read_bytes().startswith(b"\x89PNG")


def test_a_link_at_a_lifelong_plot_is_replaced_not_written_through(tmp_path):
    out = tmp_path / "run" / "plots"
    matrix, tasks = out / "accuracy_matrix.png", out / "task_accuracy.png"
    victims = [plant(matrix, tmp_path), plant(tasks, tmp_path)]
    plots.plot_accuracy_matrix([[0.5, None], [0.4, 0.6]], matrix)
    plots.plot_task_accuracy([{**ROW, "task_accuracy": [0.5, 0.1], "task": 0}], tasks)
    assert [v.read_bytes() for v in victims] == [b"victim\n"] * 2
    assert not matrix.is_symlink() and not tasks.is_symlink()


def test_a_link_at_the_plots_folder_is_refused(tmp_path):
    # on the old main the run's figures landed in the folder the link names
    run = tmp_path / "run"
    recorder = RunRecorder(run, {"strategy": "s"}, plots=True)
    recorder.log_round(ROW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "plots").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SymlinkError, match="plots is a symbolic link"):
        recorder.finish()
    assert list(elsewhere.iterdir()) == []


def test_a_link_at_a_client_lock_file_is_refused_and_creates_nothing(tmp_path):
    # on the old main open(..., "a") created the victim through the dangling link
    store = ClientStore(tmp_path / "store")
    victim = plant(tmp_path / "store" / ".client_000000.lock", tmp_path, content=None)
    with pytest.raises(SymlinkError, match=r"\.client_000000\.lock is a symbolic link"):
        store.save(0, {"w": 1}, 1)
    assert not victim.exists() and store.load(0) is None
