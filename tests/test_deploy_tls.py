"""A real deployment on loopback: a SuperLink with TLS and SuperNode authentication,
two SuperNodes (one holding a partition of Fashion-MNIST, one its own .npz file),
2 rounds of dsfl submitted with `flwr run`. Beside them, a registered node with
missing data fails its handshake and is left out; an unregistered node, an insecure
node and a node trusting another CA are refused. The run completes, and its metrics
equal those of `fedkd-sim` with the same overrides."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkd.results import TIMING_FIELDS, read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OVERRIDES = (
    "num_clients=2 clients_per_round=2 rounds=2 proxy.size=500 "
    "eval.client_test_size=500 eval.teacher_test_size=1000 output.plots=false"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Background processes, each in its own session, killed with their children."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{args}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    return out.stdout


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def online_nodes(env: dict[str, str]) -> int:
    nodes = json.loads(cli(env, "flwr", "supernode", "list", "--format", "json"))["nodes"]
    return sum(1 for n in nodes if n.get("status") == "online")


def test_tls_authenticated_deployment_runs_dsfl_and_refuses_strangers(tmp_path):
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp) by name
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": path}
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    cli(env, "fedkd-deploy", "certs", str(certs))
    cli(env, "fedkd-deploy", "certs", str(tmp_path / "other-ca"))
    cli(env, "fedkd-deploy", "keys", str(keys), "--nodes", "4")
    bundle = tmp_path / "bundle.npz"
    cli(env, "fedkd-deploy", "bundle", str(bundle), *OVERRIDES.split())
    device_data = tmp_path / "device1.npz"  # node 1's own file: partition 1
    cli(env, "fedkd-deploy", "shard", str(device_data), "--partition", "1", *OVERRIDES.split())

    port = free_port()
    link = f"127.0.0.1:{port}"
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedkd"\n\n[superlink.fedkd]\naddress = "{link}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    procs = Processes(tmp_path / "logs", env)
    try:
        procs.start(
            "superlink", "flower-superlink", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        )  # fmt: skip
        wait_until(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink")
        for i in range(3):  # node-3 stays unregistered
            cli(env, "flwr", "supernode", "register", str(keys / f"node-{i}.pub"))

        def supernode(name: str, *args: str, node_config: str) -> subprocess.Popen:
            return procs.start(
                name, "flower-supernode", "--superlink", link, "--port", str(free_port()),
                "--node-config", node_config, *args,
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
    finally:
        procs.stop_all()

    # the node with missing data: one line in the run's log, and the run went on
    assert "failed the handshake and is left out" in streamed, streamed[-3000:]
    assert "missing.npz does not exist" in streamed
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
