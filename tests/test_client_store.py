"""The client store under hostile timing and files: a straggler never replaces a newer
round, an unreadable state falls back to the previous one (counted, warned once), a
planted pickle never runs, and runs sharing one client_state_dir keep to their own
files (issue 15, "Files")."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedkd.client_store import ROUND, ClientStore, StoreError
from tests.conftest import TINY, compose_cfg
from tests.test_files import Payload, played, same, snapshot
from tests.test_simulation import without_timing


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), float(value))}, "task": 0}


def weight(s: dict | None) -> float:
    assert s is not None
    return float(s["model"]["w"][0])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_straggler_never_replaces_a_newer_round(tmp_path, caplog):
    store = ClientStore(tmp_path)
    store.save(0, state(1), 1)
    store.save(0, state(2), 2)
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        store.save(0, state(1.5), 1)  # round 1's straggler finishes after round 2 saved
    assert weight(store.load(0)) == 2 and store.load(0)[ROUND] == 2
    assert weight(store.load(0, before_round=2)) == 1  # the previous state is untouched
    assert store.dropped == 1
    (line,) = warnings_of(caplog)
    assert "dropped" in line and "round-1" in line
    store.save(0, state(2.5), 2)  # the same round again (a replay after resume) is kept
    assert weight(store.load(0)) == 2.5 and weight(store.load(0, before_round=2)) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-state"])
def test_an_unreadable_state_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    store = ClientStore(tmp_path)
    store.save(3, state(1), 1)
    store.save(3, state(2), 2)
    path = store.path(3)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 300)
    else:
        torch.save([1, 2, 3], path)
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        for _ in range(3):  # every later round: the previous state, no exception
            assert weight(store.load(3)) == 1
            assert weight(store.load(3, before_round=3)) == 1
    (line,) = warnings_of(caplog)  # one warning, naming the file
    assert str(path) in line and store.corrupt == 1
    store.save(3, state(3), 3)  # replaces the unreadable file, keeps the good previous
    assert weight(store.load(3)) == 3 and weight(store.load(3, before_round=3)) == 1


def test_a_state_file_holding_code_is_never_run(tmp_path):
    store = ClientStore(tmp_path / "store")
    store.save(1, state(1), 1)
    store.save(1, state(2), 2)
    marker = tmp_path / "ran"
    torch.save({"model": Payload(marker), ROUND: 3}, store.path(1))
    assert weight(store.load(1)) == 1 and store.corrupt == 1
    assert not marker.exists()


def test_state_files_load_weights_only(tmp_path):
    store = ClientStore(tmp_path)
    store.save(0, {**state(1), "dp": [(1.0, 5)], "prev_model": {"w": torch.ones(2)}}, 4)
    loaded = torch.load(store.path(0), weights_only=True)
    assert loaded[ROUND] == 4 and loaded["dp"] == [(1.0, 5)]


def test_two_runs_sharing_a_client_state_dir_touch_only_their_own_files(tmp_path):
    from fedkd.simulation import prepare

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("someone else's")
    (shared / "client_000000.pt").write_bytes(b"an older fedkd's state, no marker")
    cfg = compose_cfg(*TINY, f"simulation.client_state_dir={shared}")
    run_a, run_b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    dir_a = Path(prepare(cfg, run_a)["simulation"]["client_state_dir"])
    dir_b = Path(prepare(cfg, run_b)["simulation"]["client_state_dir"])
    assert dir_a != dir_b and dir_a.parent == dir_b.parent == shared.resolve()
    ClientStore(dir_a).save(0, state(1), 1)
    ClientStore(dir_b).save(0, state(2), 1)

    def others() -> dict[str, bytes]:  # everything in the shared folder but b's files
        return {k: v for k, v in snapshot(shared).items() if not k.startswith(dir_b.name)}

    kept = {"a": snapshot(dir_a), "shared": others()}

    prepare(cfg, run_b)  # run b starts again: only its own states go
    assert ClientStore(dir_b).load(0) is None
    ClientStore(dir_b).save(0, state(3), 1)
    ClientStore(dir_b, run_id=str(run_b)).remove()  # keep_client_state=false, end of b
    assert not dir_b.exists()
    assert snapshot(dir_a) == kept["a"] and others() == kept["shared"]

    # a store another run owns, or states no run claims, are never deleted
    with pytest.raises(StoreError, match="another run"):
        ClientStore(dir_a, run_id=str(run_b)).clear()
    ClientStore(dir_a, run_id=str(run_b)).remove()
    with pytest.raises(StoreError, match="no run claims"):
        ClientStore(shared, run_id="x").clear()
    assert snapshot(dir_a) == kept["a"] and (shared / "client_000000.pt").exists()


def test_same_config_and_seed_give_the_same_metrics_with_a_shared_store(tmp_path):
    shared = f"simulation.client_state_dir={tmp_path / 'shared'}"
    *_, rows_a, _ = played(tmp_path / "a", shared)
    *_, rows_b, _ = played(tmp_path / "b", shared)
    assert len(rows_a) == 2
    assert same(without_timing(rows_a), without_timing(rows_b))
