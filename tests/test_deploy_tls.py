"""A real deployment on loopback: a SuperLink with TLS and SuperNode authentication,
two SuperNodes (one holding a partition of Fashion-MNIST, one its own .npz file),
2 rounds of dsfl submitted with `flwr run`. Beside them, a registered node with
missing data fails its handshake and is left out; an unregistered node, an insecure
node and a node trusting another CA are refused. The run completes, and its metrics
equal those of `fedkd-sim` with the same overrides."""

from __future__ import annotations

import json
import subprocess

import pytest

from fedkd.results import TIMING_FIELDS, read_metrics
from tests.deploy_helpers import (
    Processes,
    cli,
    flwr_env,
    free_port,
    online_nodes,
    start_superlink,
    wait_until,
)

pytestmark = pytest.mark.slow

OVERRIDES = (
    "num_clients=2 clients_per_round=2 rounds=2 proxy.size=500 "
    "eval.client_test_size=500 eval.teacher_test_size=1000 output.plots=false"
)


def test_tls_authenticated_deployment_runs_dsfl_and_refuses_strangers(tmp_path):
    env = flwr_env(tmp_path)
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    cli(env, "fedkd-deploy", "certs", str(certs))
    cli(env, "fedkd-deploy", "certs", str(tmp_path / "other-ca"))
    cli(env, "fedkd-deploy", "keys", str(keys), "--nodes", "4")
    bundle = tmp_path / "bundle.npz"
    cli(env, "fedkd-deploy", "bundle", str(bundle), *OVERRIDES.split())
    device_data = tmp_path / "device1.npz"  # node 1's own file: partition 1
    cli(env, "fedkd-deploy", "shard", str(device_data), "--partition", "1", *OVERRIDES.split())

    procs = Processes(tmp_path / "logs", env)
    try:
        link = start_superlink(procs, env, certs, free_port())
        for i in range(3):  # node-3 stays unregistered
            cli(env, "flwr", "supernode", "register", str(keys / f"node-{i}.pub"))

        def supernode(name: str, *args: str, node_config: str) -> subprocess.Popen:
            return procs.start(
                name, "flower-supernode", "--superlink", link, "--port", str(free_port()),
                "--node-config", f'{node_config} state-dir="{tmp_path / "state" / name}"',
                *args,
            )  # fmt: skip

        tls = ("--root-certificates", str(certs / "ca.crt"))
        supernode(
            "node0", *tls, "--auth-supernode-private-key", str(keys / "node-0"),
            node_config="partition-id=0 num-partitions=2",
        )  # fmt: skip
        supernode(
            "node1", *tls, "--auth-supernode-private-key", str(keys / "node-1"),
            node_config=f'partition-id=1 data-path="{device_data}" '
            f'bundle="{bundle}"',
        )  # fmt: skip
        supernode(
            "bad-data", *tls, "--auth-supernode-private-key", str(keys / "node-2"),
            node_config=f'partition-id=1 data-path="{tmp_path / "missing.npz"}" '
            f'bundle="{bundle}"',
        )  # fmt: skip
        refused = {
            "unregistered": supernode(
                "unregistered", *tls, "--auth-supernode-private-key", str(keys / "node-3"),
                "--max-retries", "1", node_config="partition-id=0",
            ),
            "insecure": supernode(
                "insecure", "--insecure", "--max-retries", "1", node_config="partition-id=0"
            ),
            "other-ca": supernode(
                "other-ca", "--root-certificates", str(tmp_path / "other-ca" / "ca.crt"),
                "--auth-supernode-private-key", str(keys / "node-3"),
                "--max-retries", "1", node_config="partition-id=0",
            ),
        }  # fmt: skip
        for name, proc in refused.items():
            assert proc.wait(timeout=120) != 0, procs.log(name)
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        assert "certificate verify failed" in procs.log("other-ca").lower()
        wait_until(lambda: online_nodes(env) == 3, 120, "three admitted SuperNodes")

        out = tmp_path / "out"
        streamed = cli(
            env, "flwr", "run", ".", "--stream",
            "--run-config", f'overrides="{OVERRIDES}" out-dir="{out}"',
            timeout=900,
        )  # fmt: skip
        bad_data_log = procs.log("bad-data")
    finally:
        procs.stop_all()

    # the node with missing data: one line in the run's log, and the run went on
    assert "failed the handshake and is left out" in streamed, streamed[-3000:]
    # the server learns the kind of failure; the path the device read stays on it
    assert "could not serve the query message (DataError" in streamed
    assert "missing.npz" not in streamed
    assert "missing.npz does not exist" in bad_data_log
    (run,) = out.glob("run-*")
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and r["failed"] == 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["nodes"], summary["nodes_admitted"]) == (3, 2)  # bad-data node left out
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0

    sim = tmp_path / "sim"
    cli(env, "fedkd-sim", *OVERRIDES.split(), f"hydra.run.dir={sim}", timeout=900)

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    assert comparable(rows) == comparable(read_metrics(sim))
