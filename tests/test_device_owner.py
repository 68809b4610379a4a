"""A device answers to its owner (issue 29): through `fedkd.app:client_app`, called
as Flower's runtime calls it, nothing a server submits reads the device's files or
environment, imports code, replays its privacy budget or escapes its policy; and
nothing the device read comes back in an error.

Each attack here succeeded on the old main (fb2eed6): the run config was executed as
Hydra overrides on the device, rounds were not checked to go forward, and the
accountant started afresh in every run."""

from __future__ import annotations

import math
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedkd import app as flwr_app
from fedkd.compose import compose_config
from fedkd.node_config import RunRefused, compose_node_config, run_overrides
from fedkd.node_ledger import Entry, NodeLedger
from fedkd.privacy.accounting import composed_epsilon
from fedkd.protocol import CONFIG, QUERY, TRAIN
from fedkd.round_loop import prepare_round
from fedkd.server_state import build_server_state
from tests.conftest import TINY

OVERRIDES = " ".join(TINY)
SECRET_FILE_VALUE = "planted-file-secret-5c1e"
SECRET_ENV_VALUE = "planted-env-secret-93ab"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A device with a secret YAML file, a secret environment variable and a module
    that records its own import."""
    secrets = tmp_path / "secrets" / "dataset"
    secrets.mkdir(parents=True)
    (secrets / "secrets.yaml").write_text(f"name: {SECRET_FILE_VALUE}\nroot: null\n")
    monkeypatch.setenv("FEDKD_PLANTED_SECRET", SECRET_ENV_VALUE)
    marker = tmp_path / "imported"
    (tmp_path / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, marker


def context(tmp_path, overrides: str, **node) -> Context:
    node_config = {"partition-id": 1, "state-dir": str(tmp_path / "state"), **node}
    return Context(
        run_id=7,
        node_id=99,
        node_config=node_config,
        state=RecordDict(),
        run_config={"overrides": overrides},
    )


def query(tmp_path, overrides: str, **node) -> Message:
    content = RecordDict({CONFIG: ConfigRecord({"want": "partition-id"})})
    msg = Message(content, dst_node_id=99, message_type=QUERY)
    return flwr_app.client_app(msg, context(tmp_path, overrides, **node))


ATTACKS = {
    "searchpath": "hydra.searchpath=[file://{dir}/secrets] dataset=secrets",
    "hydra-run-dir": "hydra.run.dir=/tmp/elsewhere",
    "env-interpolation": "dataset.name=${{oc.env:FEDKD_PLANTED_SECRET}}",
    "env-in-allowed-key": "train.lr=${{oc.env:FEDKD_PLANTED_SECRET}}",
    "plugins": "plugins=[evil_plugin]",
    "append-plugins": "+plugins=[evil_plugin]",
    "data-root": "dataset.root={dir}",
    "download": "dataset.download=true",
    "folder-path": "dataset=folder dataset.path=..",  # a directory beside the node's
    "hub-path": "dataset=hf dataset.path=mnist",  # a download onto the device
    "state-dir": "simulation.client_state_dir={dir}",
    "straggler-sleep": "faults.straggler_prob=1.0 faults.straggler_delay=1e9",
    "fault-group": "faults=hostile",
    "add-key": "+extra=1",
    "delete-key": "~dataset",
    "group-path": "dataset=../../secrets/dataset/secrets",
    "quoted-value": "dataset.name='x y'",
    "function": "seed=choice(1,2)",
    "not-key-value": "rounds",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_run_config_attack_is_refused_naming_the_key_and_leaking_nothing(planted, attack, caplog):
    tmp_path, marker = planted
    overrides = f"{OVERRIDES} " + ATTACKS[attack].format(dir=tmp_path)
    with pytest.raises(RunRefused, match="this node refuses the run config") as info:
        query(tmp_path, overrides)
    text = str(info.value)
    assert "\n" not in text
    assert SECRET_FILE_VALUE not in text and SECRET_ENV_VALUE not in text
    assert str(tmp_path) not in text  # no path read on (or chosen for) the device
    assert not marker.exists()  # no module imported
    assert "fedkd: this node refuses the run config" in caplog.text  # one line on the device


def test_an_owner_file_with_secrets_is_never_quoted_back(planted, caplog):
    tmp_path, _ = planted
    own = tmp_path / "node.yaml"
    own.write_text("dataset:\n  name: ${oc.env:FEDKD_PLANTED_SECRET}\n")
    with pytest.raises(RunRefused) as info:
        query(tmp_path, OVERRIDES, config=str(own))
    assert "'dataset.name' is not valid on this node" in str(info.value)
    assert SECRET_ENV_VALUE not in str(info.value)
    assert SECRET_ENV_VALUE in caplog.text  # the owner reads the details in the node's log


def test_any_other_failure_names_only_its_type(planted):
    tmp_path, _ = planted
    missing = tmp_path / "secret-folder" / "data.npz"
    node = {"data-path": str(missing), "bundle": str(tmp_path / "bundle.npz")}
    with pytest.raises(RunRefused, match=r"could not serve the query message \(DataError") as info:
        query(tmp_path, OVERRIDES, **node)
    assert "secret-folder" not in str(info.value)


def test_the_owner_config_wins_and_keeps_the_device_keys(tmp_path):
    own = tmp_path / "node.yaml"
    own.write_text("train:\n  epochs: 1\nsimulation:\n  register_timeout: 33\n")
    run = "experiment=cross_device train.epochs=3 train.lr=0.5"
    cfg = compose_node_config(run, str(own))
    assert cfg["train"]["epochs"] == 1  # the owner's
    assert cfg["train"]["lr"] == 0.5  # the run's (allowed)
    # cross_device sets simulation.register_timeout=600: the device keeps its owner's
    assert cfg["simulation"]["register_timeout"] == 33
    assert compose_config(run)["simulation"]["register_timeout"] == 600


def test_allowed_overrides_compose_the_same_config_as_the_server():
    assert run_overrides(OVERRIDES) == list(TINY)
    assert compose_node_config(OVERRIDES) == compose_config(OVERRIDES)
    # the server's own settings pass; on the device they stay the owner's (unused there)
    server_only = f"{OVERRIDES} output.plots=false simulation.round_timeout=60"
    node = compose_node_config(server_only)
    assert node["output"]["plots"] is False
    assert node["simulation"]["round_timeout"] is None


# ------------------------------------------------------------------- rounds and budget
def downloads(overrides: str, rnd: int) -> dict[int, RecordDict]:
    """The honest server's downloads of round `rnd` (every partition admitted)."""
    cfg = compose_config(overrides)
    state = build_server_state(cfg, "cpu")
    state.population = list(range(cfg["num_clients"]))
    state.round = rnd - 1
    _, out = prepare_round(state, rnd)
    return dict(out)


def with_round(content: RecordDict, rnd) -> RecordDict:
    plan = dict(content.config_records[CONFIG])
    plan["round"] = rnd
    out = RecordDict(dict(content.items()))
    out[CONFIG] = ConfigRecord(plan)
    return out


def train(tmp_path, content: RecordDict, overrides: str, **node) -> Message:
    msg = Message(content, dst_node_id=99, message_type=TRAIN)
    return flwr_app.client_app(msg, context(tmp_path, overrides, **node))


DP = f"{OVERRIDES} privacy=sample privacy.batch_size=50"


def one_round_epsilon(cfg_overrides: str, shard: int) -> float:
    from fedkd.privacy.dpsgd import dp_steps_per_round

    cfg = compose_config(cfg_overrides)
    rate, steps = dp_steps_per_round(shard, cfg["privacy"]["batch_size"], cfg["train"]["epochs"])
    return composed_epsilon([(rate, cfg["privacy"]["noise_multiplier"], steps)], 1e-5)


def test_replayed_backward_huge_and_float_rounds_cost_nothing(tmp_path, caplog):
    """On the old main the same round sent 50 times gave 53 DP-SGD releases, while
    the device reported a fraction of the true epsilon."""
    down = downloads(DP, 1)[1]
    reply = train(tmp_path, down, DP)
    ledger = NodeLedger(tmp_path / "state", 1)
    honest = ledger.epsilon(1e-5)
    shard = reply.content.metric_records["metrics"]["num-examples"]
    assert honest == pytest.approx(one_round_epsilon(DP, shard))
    assert reply.content.metric_records["metrics"]["dp-epsilon"] == pytest.approx(honest)
    assert dict(reply.content.config_records["info"]) == {}  # not even its host name
    for rnd, why in [
        (1, "this run's rounds must go forward"),
        (0, "malformed round plan: round must be an integer >= 1"),
        (2**62, "is outside the run's rounds"),
        (5.0, "malformed round plan: 'round' must be an integer, not 5.0"),
        (True, "malformed round plan: 'round' must be an integer, not True"),
    ]:
        with pytest.raises(RunRefused, match=why):
            train(tmp_path, with_round(down, rnd), DP)
    assert ledger.epsilon(1e-5) == honest  # nothing refused was spent
    assert [(e.run, e.round) for e in ledger.entries()] == [(7, 1)]
    # a new run may train again: its own round 1, spending more of the same budget
    ctx = context(tmp_path, DP)
    ctx.run_id = 8
    flwr_app.client_app(Message(down, dst_node_id=99, message_type=TRAIN), ctx)
    assert ledger.epsilon(1e-5) > honest
    assert [(e.run, e.round) for e in ledger.entries()] == [(7, 1), (8, 1)]


def test_max_epsilon_refuses_a_round_that_would_overspend(tmp_path, caplog):
    down = downloads(DP, 1)[1]
    with pytest.raises(RunRefused, match="beyond its max-epsilon") as info:
        train(tmp_path, down, DP, **{"max-epsilon": 0.01})
    assert "0.01" not in str(info.value)  # the owner's limit stays on the device
    assert "over max-epsilon=0.01" in caplog.text
    assert NodeLedger(tmp_path / "state", 1).entries() == []
    train(tmp_path, down, DP, **{"max-epsilon": 100.0})
    assert len(NodeLedger(tmp_path / "state", 1).entries()) == 1


def test_the_ledger_is_append_only_and_fails_closed(tmp_path):
    ledger = NodeLedger(tmp_path)
    ledger.admit(Entry(run=1, round=1, q=0.1, sigma=1.0, steps=10), None, 1e-5)
    with pytest.raises(RunRefused, match="must go forward"):
        ledger.admit(Entry(run=1, round=1), None, 1e-5)
    ledger.admit(Entry(run=2, round=1), None, 1e-5)
    assert ledger.epsilon(1e-5) == composed_epsilon([(0.1, 1.0, 10)], 1e-5)
    with open(ledger.path, "a") as f:
        f.write("not json\n")
    with pytest.raises(RunRefused, match="ledger is unreadable"):
        ledger.admit(Entry(run=3, round=1), None, 1e-5)
    assert composed_epsilon([(0.1, 0.0, 3)], 1e-5) == math.inf  # no noise: no privacy


def test_two_nodes_sharing_a_state_dir_keep_their_own_budgets(tmp_path):
    for pid in (0, 1):  # two SuperNodes on one machine, the default state-dir
        NodeLedger(tmp_path, pid).admit(Entry(run=7, round=1, q=0.1, sigma=1, steps=5), None, 1e-5)
    assert NodeLedger(tmp_path, 0).entries() == NodeLedger(tmp_path, 1).entries()
    with pytest.raises(RunRefused, match="must go forward"):
        NodeLedger(tmp_path, 1).admit(Entry(run=7, round=1), None, 1e-5)


def test_a_symlinked_ledger_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger-0.jsonl").symlink_to(victim)
    with pytest.raises(RunRefused, match="ledger is unreadable"):
        NodeLedger(tmp_path / "state").admit(Entry(run=1, round=1), None, 1e-5)
    assert victim.read_text() == ""


def test_weights_are_refused_by_default_even_when_the_run_names_fedavg(tmp_path):
    fedavg = f"{OVERRIDES} strategy=fedavg"
    with pytest.raises(RunRefused, match=r"strategy's reply \(weights\) is outside"):
        query(tmp_path, fedavg)
    reply = query(tmp_path, fedavg, **{"allow-replies": "weights"})
    assert not reply.has_error()


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX file semantics")
