"""`simulation.ray_address` joins an existing Ray cluster: a head and a worker node
started with `ray start` on loopback, one CPU each, and the run's clients land on both."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_simulation import fedkd_sim

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture
def two_node_cluster(tmp_path):
    # A private temp dir keeps this cluster apart from any other Ray on the machine.
    temp_dir = Path("/tmp") / f"fedkd-ray-{os.getpid()}"
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    try:
        ray_cli(
            "start", "--head", f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1",
            "--include-dashboard=false", f"--temp-dir={temp_dir}", *common, env=env,
        )  # fmt: skip
        ray_cli("start", f"--address={address}", "--node-ip-address=127.0.0.1", *common, env=env)
        yield address
    finally:
        stop_cluster(address)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(address: str) -> None:
    """Kill this cluster's processes only. `ray stop` would kill every Ray instance
    of the user on the machine, including simulations running beside the tests."""
    import psutil

    port = address.rsplit(":", 1)[1]
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmd and (f":{port}" in cmd or f"--gcs_server_port={port}" in cmd):
            ours.append(proc)
    for proc in ours:
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
    psutil.wait_procs(ours, timeout=30)


def test_clients_run_on_both_nodes_of_a_ray_cluster(two_node_cluster, tmp_path):
    run = tmp_path / "run"
    fedkd_sim(
        *TINY,
        "num_clients=4",
        "clients_per_round=4",
        f"simulation.ray_address={two_node_cluster}",
        f"hydra.run.dir={run}",
        timeout=600,
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["ray_nodes"] == 2  # the clients' replies name two different Ray nodes
