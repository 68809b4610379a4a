"""fedkd-bench's measurements that are not the simulator itself."""

from __future__ import annotations

import math

from omegaconf import OmegaConf


def test_training_floor_times_the_local_sgd_of_every_round(plain_cfg, tmp_path):
    """The training floor replays the workload's rounds (the server's own plans) and
    times only its clients' local SGD on 2 worker processes: one steady round."""
    from simulations.bench_measure import run_training_floor

    cfg = plain_cfg("strategy=fedavg", "rounds=3", "num_clients=6", "clients_per_round=4")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    floor = run_training_floor(path, tmp_path / "floor", 2)["floor2_round_seconds"]
    assert math.isfinite(floor) and floor > 0
