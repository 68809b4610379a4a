import pytest
from omegaconf import OmegaConf

from fedkd.compose import group_options, validate
from fedkd.errors import ConfigError
from tests.conftest import compose_cfg


def test_default_config_is_the_documented_experiment():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.dataset.name == "fashion_mnist"
    assert cfg.num_clients == 10 and cfg.clients_per_round == 10 and cfg.rounds == 20
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.proxy.size == 5000
    assert cfg.strategy.name == "dsfl"
    assert cfg.model.student == "cnn_small" and cfg.model.teacher == "cnn"


@pytest.mark.parametrize("strategy", group_options("strategy"))
def test_every_strategy_config_validates(strategy):
    validate(compose_cfg(f"strategy={strategy}"))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_config_validates(experiment):
    validate(compose_cfg(f"experiment={experiment}"))


def test_the_promised_groups_and_keys_exist():
    for group in ("dataset", "partition", "model", "strategy", "simulation", "experiment"):
        assert group_options(group), group
    cfg = compose_cfg(
        "seed=3",
        "rounds=4",
        "num_clients=5",
        "clients_per_round=2",
        "partition.alpha=0.1",
        "proxy.size=100",
        "distill.temperature=2",
    )
    assert (cfg.seed, cfg.rounds, cfg.partition.alpha, cfg.proxy.size, cfg.distill.temperature) == (
        3,
        4,
        0.1,
        100,
        2,
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("partition.alpha=0", "partition.alpha"),
        ("partition.alpha=-1", "partition.alpha"),
        ("distill.temperature=0", "distill.temperature"),
        ("clients_per_round=11", "clients_per_round"),
        ("model.student=vgg99", "model.student"),
        ("model.teacher=nope", "model.teacher"),
        ("dataset.name=mnist", "dataset.name"),
        ("partition.name=weird", "partition.name"),
        ("rounds=0", "rounds"),
        ("proxy.subset_size=6000", "proxy.subset_size"),
        ("train.lr=0", "train.lr"),
        ("distill.alpha=1.5", "distill.alpha"),
        ("simulation.num_gpus=lots", "simulation.num_gpus"),
        ("strategy.era_temperature=0", "strategy.era_temperature"),
        ("+strategy.bogus=1", "strategy.bogus"),
        ("strategy=fedavg model=hetero", "model.students"),
        ("distill.server_optimizer=lbfgs", "distill.server_optimizer"),
        ("distill.client_schedule=interleaved", "distill.client_schedule"),
        ("distill.server_temperature=0", "distill.server_temperature"),
        ("distill.server_momentum=1", "distill.server_momentum"),
        ("distill.client_lr=0", "distill.client_lr"),
        ("strategy.broadcast=weights", "strategy.broadcast"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, key):
    cfg = compose_cfg(*override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}=") and "not allowed" in message and "\n" not in message


def test_schema_rejects_wrong_types_and_unknown_keys():
    from hydra.errors import ConfigCompositionException as HydraCompose

    with pytest.raises(HydraCompose):
        compose_cfg("rounds=abc")
    with pytest.raises(HydraCompose):
        compose_cfg("no_such_key=1")


def test_resolved_config_round_trips_through_yaml():
    cfg = compose_cfg()
    assert OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg)), resolve=True)
