"""A device answers to its owner (issue 29), against a real hostile server: a
SuperLink on loopback, one fedkd SuperNode with planted secrets (a YAML file a
`hydra.searchpath` would load, an environment variable, a module on its
PYTHONPATH that records its own import), and a malicious Flower app,
tests/hostile_server/, whose ServerApp attacks the node and writes down
everything it gets back. Its bundle carries no fedkd code, so the node runs the
fedkd installed on it.

An honest `flwr run .` of 2 DP-SGD rounds comes first; then one run of every plan
attack (after one honest round of its own) and one run per run-config attack.
Each attack is refused before any training, in one line naming keys, with a
`fedkd: ` line in the node's log; nothing the device read, and none of its paths,
reaches the server; the planted module is never imported; and the device's
epsilon is exactly what its three honest rounds cost.

tests/test_device_owner.py attacks the same defences in-process."""

from __future__ import annotations

import base64
import json
import re
import secrets
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedkd.node_ledger import Entry, NodeLedger
from fedkd.privacy.accounting import composed_epsilon
from fedkd.privacy.dpsgd import dp_steps_per_round
from tests import deploy_helpers as dh

pytestmark = pytest.mark.slow

HOSTILE_APP = dh.ROOT / "tests" / "hostile_server"
BASE = (
    "experiment=smoke dataset.synthetic.train_size=600 dataset.synthetic.test_size=200 "
    "proxy.size=100 num_clients=1 clients_per_round=1 rounds=2 privacy=sample output.plots=false"
)
DELTA = 1e-5
SIGMA, BATCH, EPOCHS = 1.0, 32, 1  # conf/privacy/sample.yaml, train.* (BASE's DP-SGD)
MAX_DOWNLOAD = 64 * 1024  # the node's max-download-bytes (the download attacks send more)
RUNS_AT_ONCE = 7  # run-config attacks in flight (a ClientApp is a process of ~1 GB)

REFUSED = "this node refuses the run config: "
POLICY = "this node's policy refuses the run: "

# run config `overrides` (BASE, with these settings in place of BASE's own) -> the
# device's answer; {dir} is the test's folder
CONFIG_ATTACKS = {
    "searchpath": (
        "hydra.searchpath=[file://{dir}/secrets] dataset=secrets",
        REFUSED + "'hydra.searchpath' may not be set by a run",
    ),
    "env-interpolation": (
        "dataset.name=${{oc.env:FEDKD_PLANTED_SECRET}}",
        REFUSED + "'dataset.name' needs a plain value",
    ),
    "plugins": ("plugins=[evil_plugin]", REFUSED + "'plugins' is the device owner's"),
    "data-root": ("dataset.root={dir}/elsewhere", REFUSED + "'dataset.root' is the device"),
    "state-dir": (
        "simulation.client_state_dir={dir}/elsewhere",
        REFUSED + "'simulation.client_state_dir' is the device",
    ),
    "straggler": (
        "faults.straggler_prob=1.0 faults.straggler_delay=1e9",
        REFUSED + "'faults.straggler_prob' is the device",
    ),
    "add-key": ("+extra=1", REFUSED + "'+extra' is not a plain"),
    "delete-key": ("~dataset", REFUSED + "'~dataset' is not a plain"),
    "privacy-none": ("privacy=none", POLICY + "privacy.mode is below min-privacy"),
    "zero-noise": (
        "privacy.noise_multiplier=0",
        POLICY + "privacy.noise_multiplier is below the node's noise floor",
    ),
    "replayable-noise": (
        "privacy.secure_noise=false",
        POLICY + "privacy.secure_noise is off",
    ),
    "weights": ("strategy=fedavg", POLICY + "the strategy's reply (weights) is outside"),
    "huge-rounds": (f"rounds={2**62}", POLICY + "rounds exceeds max-rounds"),
}

PLAN = "this node's policy refuses round {}'s plan: "


def npy_bytes(nbytes: int) -> int:
    """What the node counts of the hostile server's extra array of `nbytes` bytes."""
    return ArrayRecord({"x": Array(np.zeros(nbytes // 2, np.float16))}).count_bytes()


MALFORMED = "malformed round plan: "
# tests/hostile_server/hostile_server.py plan_attacks, in its order -> the answer
PLAN_ATTACKS = {
    "replayed-round": "this node refuses round 2: this run's rounds must go forward",
    "backward-round": "this node refuses round 1: this run's rounds must go forward",
    "huge-round": PLAN.format(2**62) + f"round={2**62} is outside the run's rounds",
    "float-round": MALFORMED + "'round' must be an integer, not 3.0",
    "reply-weights": PLAN.format(3) + "reply='weights' is outside allow-replies",
    "huge-epochs": PLAN.format(3) + "epochs=1000000000/kd_epochs=1 exceed max-epochs",
    "sequential-kd-epochs": PLAN.format(3) + "epochs=1/kd_epochs=1000000000 exceed max-epochs",
    "kd-steps": PLAN.format(3) + "the local optimizer steps exceed max-steps",
    "proxy-segments": PLAN.format(3) + "100000 proxy/teacher/memory segments exceed",
    "huge-items": PLAN.format(3) + "1000000000000 proxy/teacher/memory items exceed",
    "memory-segments": PLAN.format(3) + "100001 proxy/teacher/memory segments exceed",
    "teacher-count": PLAN.format(3) + "teacher_count=1000000000 exceeds the round's proxy",
    "extra-download": PLAN.format(3) + f"a download of {npy_bytes(128 * 1024)} bytes exceeds",
    "huge-teacher": PLAN.format(3) + f"a download of {npy_bytes(256 * 1024)} bytes exceeds",
    "zero-batch": MALFORMED + "batch-size must be integers >= 1",
    "nan-lr": MALFORMED + "'lr' must be a finite number, not nan",
}

# on the node's PYTHONPATH beside the planted module: each process that imports
# fedkd writes down which one (the hostile bundle has none: the node's must run)
SITECUSTOMIZE = """\
import json, os, sys

def _where(event, args):
    # which fedkd a process imports, once it imports any of it (test instrumentation)
    if event == "import" and str(args[0]).startswith("fedkd.") and "fedkd" in sys.modules:
        if not getattr(sys, "_fedkd_seen", False):
            sys._fedkd_seen = True
            line = {{"pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else "",
                     "fedkd": getattr(sys.modules["fedkd"], "__file__", None)}}
            with open({log!r}, "a") as f:
                f.write(json.dumps(line) + "\\n")

sys.addaudithook(_where)
"""


def with_settings(base: str, attack: str) -> str:
    """`base` with `attack`'s settings in place of its own for the same keys."""
    keys = {item.split("=")[0].lstrip("+~") for item in attack.split()}
    kept = [item for item in base.split() if item.split("=")[0] not in keys]
    return " ".join([*kept, attack])


def run_config(path: Path, **values: str) -> str:
    """A run config as a TOML file (no quoting of overrides on a command line)."""
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


def public_text(reason: str) -> str:
    """What a refusal said, out of Flower's "<class '...'>:<'text'>" reason."""
    match = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", reason, re.S)
    assert match, reason
    return match.group(1)


def received_bytes(value) -> list[bytes]:
    """Every byte string in a dumped record (base64 in received.jsonl)."""
    if isinstance(value, dict):
        if set(value) >= {"bytes"}:
            return [base64.b64decode(value["bytes"])]
        return [b for v in value.values() for b in received_bytes(v)]
    if isinstance(value, list):
        return [b for v in value for b in received_bytes(v)]
    return []


@pytest.fixture
def device(tmp_path):
    """The device's planted secrets, its owner's file and its environment."""
    file_secret, env_secret = f"file-{secrets.token_hex(8)}", f"env-{secrets.token_hex(8)}"
    sdir = tmp_path / "secrets" / "dataset"
    sdir.mkdir(parents=True)
    (sdir / "secrets.yaml").write_text(f"name: {file_secret}\nroot: null\n")
    path = tmp_path / "device-path"
    path.mkdir()
    marker = tmp_path / "evil-plugin-imported"
    (path / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    imports = tmp_path / "fedkd-imports.jsonl"
    (path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(log=str(imports)))
    owner = tmp_path / "owner" / "node.yaml"
    owner.parent.mkdir()
    owner.write_text("simulation:\n  num_cpus: 1\n")
    env = {
        **dh.flwr_env(tmp_path),
        "FLWR_HOME": str(tmp_path / "node-home"),
        "PYTHONPATH": str(path),
        "FEDKD_PLANTED_SECRET": env_secret,
    }
    return {
        "secrets": (file_secret, env_secret),
        "marker": marker,
        "imports": imports,
        "owner": owner,
        "state": tmp_path / "node-state",
        "env": env,
    }


def test_a_hostile_server_gets_nothing_from_a_device(tmp_path, device):
    env = dh.flwr_env(tmp_path)
    out = tmp_path / "hostile"
    link_procs = dh.Processes(tmp_path / "logs", env)
    node_procs = dh.Processes(tmp_path / "logs", device["env"])
    runs = tmp_path / "run-configs"
    runs.mkdir()
    try:
        link = dh.start_insecure_superlink(link_procs, env, dh.free_port())
        node_config = (
            f'partition-id=0 state-dir="{device["state"]}" min-privacy="sample" '
            f'config="{device["owner"]}" max-download-bytes={MAX_DOWNLOAD}'
        )
        node_procs.start(
            "node", "flower-supernode", "--insecure", "--superlink", link,
            "--port", str(dh.free_port()), "--node-config", node_config,
        )  # fmt: skip
        dh.wait_until(lambda: dh.online_nodes(env) == 1, 120, "the SuperNode")

        # an honest run: fedkd's own app, 2 rounds of DP-SGD
        honest_out = tmp_path / "honest"
        honest_rc = run_config(runs / "honest.toml", overrides=BASE, **{"out-dir": str(honest_out)})
        dh.cli(env, "flwr", "run", ".", "--stream", "--run-config", honest_rc, timeout=600)
        ledger = NodeLedger(device["state"], 0)  # partition 0's
        honest_entries = ledger.entries()
        honest_eps = ledger.epsilon(DELTA)

        # every plan attack in one run, after one honest round; then each run-config attack
        hostile = {"plan-overrides": BASE, "out-dir": str(out)}
        plans = with_settings(BASE, "rounds=3")  # the attacks are round 3, within the run
        rc = run_config(runs / "plans.toml", overrides=plans, attack="plans", **hostile)
        dh.cli(env, "flwr", "run", str(HOSTILE_APP), "--stream", "--run-config", rc, timeout=600)
        after_plans = ledger.entries()
        commands = []
        for name, (attack, _) in CONFIG_ATTACKS.items():
            overrides = with_settings(BASE, attack.format(dir=tmp_path))
            rc = run_config(runs / f"{name}.toml", overrides=overrides, attack=name, **hostile)
            commands.append(("flwr", "run", str(HOSTILE_APP), "--stream", "--run-config", rc))
        for start in range(0, len(commands), RUNS_AT_ONCE):
            dh.cli_parallel(env, commands[start : start + RUNS_AT_ONCE], timeout=600)
    finally:
        node_procs.stop_all()
        link_procs.stop_all()

    node_log = node_procs.log("node")
    lines = [json.loads(x) for x in (out / "received.jsonl").read_text().splitlines()]
    by_attack: dict[str, list[dict]] = {}
    for line in lines:
        by_attack.setdefault(line["attack"], []).append(line)
    assert not [x for x in lines if x.get("missing")], "a message got no answer"

    # the honest rounds: two of DP-SGD on the node's shard, as the handshake declared it
    (hello,) = [x for x in by_attack["plans"] if x["kind"] == "query"]
    shard = hello["reply"]["metrics"]["num-examples"]
    q, steps = dp_steps_per_round(shard, BATCH, EPOCHS)
    honest_run = honest_entries[0].run
    assert honest_entries == [Entry(honest_run, r, q, SIGMA, steps) for r in (1, 2)]
    assert honest_eps == composed_epsilon([(q, SIGMA, steps)] * 2, DELTA)
    (honest,) = by_attack["honest"]
    assert honest["reply"]["metrics"]["num-examples"] == shard  # it trained
    plans_run = honest["run"]
    # the attack run's one honest round is its only entry
    assert after_plans == [*honest_entries, Entry(plans_run, 2, q, SIGMA, steps)]
    three_rounds = composed_epsilon([(q, SIGMA, steps)] * 3, DELTA)
    assert honest["reply"]["metrics"]["dp-epsilon"] == three_rounds  # what the device says
    (summary,) = honest_out.glob("run-*/summary.json")
    assert json.loads(summary.read_text())["epsilon"] == honest_eps  # the honest server's

    # every plan attack: refused before the ledger, in one line, logged on the device
    assert list(by_attack)[: 2 + len(PLAN_ATTACKS)] == ["plans", "honest", *PLAN_ATTACKS]
    assert set(by_attack) == {"plans", "honest", *PLAN_ATTACKS, *CONFIG_ATTACKS}
    for name, expected in PLAN_ATTACKS.items():
        (line,) = by_attack[name]
        assert "error" in line, f"{name}: not refused: {line}"
        text = public_text(line["error"]["reason"])
        assert text.startswith(expected), f"{name}: {text}"
        assert "\n" not in text
        assert f"fedkd: {text}" in node_log, name
    # every run-config attack: refused at the handshake and at the train message
    for name, (_, expected) in CONFIG_ATTACKS.items():
        query, train = by_attack[name]
        assert (query["kind"], train["kind"]) == ("query", "train")
        for line in (query, train):
            assert "error" in line, f"{name}: not refused: {line}"
            text = public_text(line["error"]["reason"])
            assert text.startswith(expected), f"{name} ({line['kind']}): {text}"
            assert "\n" not in text
            assert f"fedkd: {text}" in node_log, name

    # no attack run trained: the ledger is what the three honest rounds wrote, and
    # the device's epsilon is exactly what they cost
    final = ledger.entries()
    assert final == after_plans
    assert ledger.epsilon(DELTA) == three_rounds

    # nothing the device read, and none of its paths, reached the server
    received = (out / "received.jsonl").read_text()
    blobs = [b for line in lines for b in received_bytes(line.get("reply", {}))]
    for secret in (*device["secrets"], str(tmp_path)):
        assert secret not in received
        assert not any(secret.encode() in b for b in blobs)
    for path in honest_out.rglob("*"):  # the honest server's results too
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in device["secrets"]), path
    assert not device["marker"].exists()  # the planted module was never imported

    # the hostile bundle carried no fedkd: its ClientApps ran the node's installed fedkd
    installed = str(dh.ROOT / "fedkd" / "__init__.py")
    imports = [json.loads(x) for x in device["imports"].read_text().splitlines()]
    clientapps = [x for x in imports if x["argv0"].endswith("flwr-clientapp")]
    assert imports == clientapps  # only ClientApps import fedkd on the node
    (bundle,) = (tmp_path / "node-home" / "apps").glob("fedkd-tests.hostile-server.*")
    assert sorted(p.name for p in bundle.rglob("*") if p.is_file()) == [
        "hostile_server.py",
        "pyproject.toml",
    ]
    from_fab = [x for x in clientapps if x["fedkd"] != installed]
    assert len(from_fab) == 3  # the honest run's handshake and 2 rounds: its bundle's fedkd
    assert all(x["fedkd"].startswith(str(tmp_path / "node-home")) for x in from_fab)
    messages = len(lines)
    assert len(clientapps) - len(from_fab) == messages
