"""A real deployment on loopback where the devices hold their ground: three
authenticated SuperNodes, partitions bound to their keys (`fedkd-deploy keys`'
partition-keys.json), one round of FedAvg (which asks every client for its weights):

- node 0 holds partition 0 with the default policy, soft labels only: it refuses
  the run at the handshake, before any training, and is left out (its one-line
  refusal is in the server's log);
- node 1 holds partition 1, allows its weights, and trains;
- node 2 (key bound to partition 2, weights allowed) claims partition 1: left out
  at the handshake, while node 1, the owner, is admitted.

The run finishes with the honest node's reply."""

from __future__ import annotations

import json

import pytest

from fedkd.results import read_metrics
from tests import deploy_helpers as dh

pytestmark = pytest.mark.slow

OVERRIDES = (
    "experiment=smoke dataset.synthetic.train_size=600 dataset.synthetic.test_size=200 "
    "proxy.size=100 num_clients=2 clients_per_round=2 rounds=1 strategy=fedavg "
    "output.plots=false"
)


def test_a_logits_only_node_refuses_weights_and_an_impostor_is_left_out(tmp_path):
    env = dh.flwr_env(tmp_path)
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    dh.cli(env, "fedkd-deploy", "certs", str(certs))
    dh.cli(env, "fedkd-deploy", "keys", str(keys), "--nodes", "3")  # + partition-keys.json
    procs = dh.Processes(tmp_path / "logs", env)
    try:
        link = dh.start_superlink(procs, env, certs, dh.free_port())
        for i in range(3):
            dh.cli(env, "flwr", "supernode", "register", str(keys / f"node-{i}.pub"))
        nodes = {
            "logits-only": (0, 0, ""),  # the default policy: soft labels only
            "owner": (1, 1, ' allow-replies="weights"'),
            "impostor": (2, 1, ' allow-replies="weights"'),  # node-2's key, partition 1's claim
        }
        for name, (key, pid, policy) in nodes.items():
            procs.start(
                name, "flower-supernode", "--superlink", link, "--port", str(dh.free_port()),
                "--root-certificates", str(certs / "ca.crt"),
                "--auth-supernode-private-key", str(keys / f"node-{key}"),
                "--node-config",
                f'partition-id={pid} auth-key="{keys / f"node-{key}"}"{policy} '
                f'state-dir="{tmp_path / "state" / name}"',
            )  # fmt: skip
        dh.wait_until(lambda: dh.online_nodes(env) == 3, 120, "three SuperNodes")
        out = tmp_path / "out"
        run_config = (
            f'overrides="{OVERRIDES}" out-dir="{out}" '
            f'partition-keys="{keys / "partition-keys.json"}"'
        )
        streamed = dh.cli(
            env, "flwr", "run", ".", "--stream", "--run-config", run_config, timeout=600
        )
    finally:
        procs.stop_all()

    assert "partitions bound to 3 node keys" in streamed, streamed[-3000:]
    # the impostor: one line at the handshake, and the owner of partition 1 admitted
    assert "it claims partition 1, but its key is bound to partition 2" in streamed
    # the logits-only node: refused at the handshake, before any training, in one line
    refusal = "this node's policy refuses the run: the strategy's reply (weights) is outside "
    assert refusal + "allow-replies" in streamed, streamed[-3000:]
    (run,) = out.glob("run-*")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["nodes"], summary["nodes_admitted"]) == (3, 1)
    (row,) = read_metrics(run)
    assert (row["clients"], row["replies"], row["failed"]) == (1, 1, 0)
    assert row["bytes_up"] > 0  # the owner's weights
