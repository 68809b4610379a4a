"""Shared fixtures: compose the real config from conf/ with small overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fedkd.config import CONF_DIR

TINY = (
    "experiment=smoke",
    "dataset.synthetic.train_size=900",
    "dataset.synthetic.test_size=200",
    "proxy.size=120",
    "num_clients=3",
    "clients_per_round=3",
    "rounds=2",
)


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def tiny_cfg():
    """A composer for the tiny synthetic setting: tiny_cfg("strategy=fedmd", ...)."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg(*TINY, *overrides)

    return make


@pytest.fixture
def plain_cfg(tiny_cfg, tmp_path: Path):
    """Validated, resolved plain config (what the apps receive), data loaded."""
    from fedkd.simulation import prepare

    def make(*overrides: str) -> dict:
        return prepare(tiny_cfg(*overrides), tmp_path)

    return make


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower's Message() reads the task identity a Grid normally sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
