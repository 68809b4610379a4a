"""Helpers of the real-deployment tests (tests/test_deploy_tls.py,
tests/test_deploy_policy.py): Flower's processes on loopback, each in its own
session and stopped by process group, and the CLI calls between them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


def flwr_env(tmp_path: Path) -> dict[str, str]:
    """A Flower home of the test's own; Flower's processes start their helpers
    (flower-superexec, flwr-serverapp) by name, so the venv's bin/ is on PATH."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": path}


def start_superlink(procs: Processes, env: dict[str, str], certs: Path, port: int) -> str:
    """A SuperLink with TLS and SuperNode authentication on `port`, and `flwr`'s
    config pointing at it; returns its address once it serves."""
    link = f"127.0.0.1:{port}"
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedkd"\n\n[superlink.fedkd]\naddress = "{link}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    procs.start(
        "superlink", "flower-superlink", "--port", str(port),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
    )  # fmt: skip
    wait_until(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink")
    return link


def start_insecure_superlink(procs: Processes, env: dict[str, str], port: int) -> str:
    """A SuperLink without TLS or node authentication on `port` (loopback only), and
    `flwr`'s config pointing at it; returns its address once it serves."""
    link = f"127.0.0.1:{port}"
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedkd"\n\n[superlink.fedkd]\naddress = "{link}"\n'
        "insecure = true\n"
    )
    procs.start(
        "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
        "--port", str(port), "--disable-runtime-dependency-installation",
    )  # fmt: skip
    wait_until(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink")
    return link


def cli_parallel(env: dict[str, str], commands: list[tuple[str, ...]], timeout: float) -> list[str]:
    """`cli` for several commands at once, each in its own session (killed with its
    children if it outlives `timeout`); their outputs, in order."""
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        procs = [
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            for args, log in zip(commands, logs, strict=True)
        ]
        deadline = time.monotonic() + timeout
        outputs = []
        try:
            for args, proc, log in zip(commands, procs, logs, strict=True):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                log.seek(0)
                outputs.append(log.read())
                assert proc.returncode == 0, f"{args}: {outputs[-1][-3000:]}"
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return outputs
