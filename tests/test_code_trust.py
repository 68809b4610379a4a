"""Code trust (docs/code_trust.md): `fedkd-deploy sign-key`, `sign` and `hub` make
Flower 1.41's own FAB verification (`flower-supernode --trusted-entities`) work
offline. The fast tests check the files and signatures against Flower's own loader,
verifier and Hub client; the slow one runs it on loopback: a SuperNode that trusts
the key runs the signed fedkd FAB, and refuses an unsigned FAB (`flwr run .`) and a
FAB beside a valid signature of other bytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from simulations import code_trust, deploy
from tests import deploy_helpers as dh

PROBE_TOML = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "probe"
version = "{version}"
description = "a code-trust probe"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.flwr.app]
publisher = "fedkd"

[tool.flwr.app.components]
serverapp = "probe_app:server_app"
clientapp = "probe_app:client_app"
"""


def probe_app(root: Path, version: str = "1.0.0", code: str = "x = 1\n") -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(PROBE_TOML.format(version=version))
    (root / "probe_app.py").write_text(code)
    return root


def flower_verifies(fab: bytes, sig_files: list[Path], entities_file: Path) -> bool:
    """What a SuperNode started with --trusted-entities decides, with the
    verifications Flower's SuperLink attaches to a Hub app's run."""
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )
    from flwr.supernode.start_client_internal import _verify_fab

    entities = _try_obtain_trusted_entities(entities_file)
    _validate_public_keys_ed25519(entities)
    sigs = [json.loads(p.read_text()) for p in sig_files]
    hub_items = [{k: s[k] for k in ("public_key_id", "signature", "signed_at")} for s in sigs]
    return _verify_fab(Fab("", fab, _format_verification(hub_items)), entities)


def with_planted_module(fab: bytes) -> bytes:
    """The same app with one more module: a valid FAB of other bytes."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files

    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        files = {n: z.read(n) for n in z.namelist() if not n.startswith(".info/")}
    files["fedkd/planted.py"] = b"import os  # anything at all\n"
    return build_fab_from_files(files)[0]


def test_sign_key_writes_what_flower_supernode_loads(tmp_path, capsys):
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

    keys = tmp_path / "keys"
    deploy.main(["sign-key", str(keys)])
    key = load_private_key(keys / "fab-signing-key")  # Flower's loader: Ed25519, OpenSSH
    assert (keys / "fab-signing-key").stat().st_mode & 0o777 == 0o600
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities

    entities = _try_obtain_trusted_entities(keys / "trusted-entities.yaml")
    (key_id,) = entities
    assert key_id == code_trust._key_id(key.public_key())
    assert entities[key_id] == (keys / "fab-signing-key.pub").read_text().strip()
    before = (keys / "fab-signing-key").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["sign-key", str(keys)])
    assert exit_info.value.code == 2
    assert "fab-signing-key exists" in capsys.readouterr().err
    assert (keys / "fab-signing-key").read_bytes() == before  # nothing overwritten


def test_a_signed_fab_verifies_and_other_bytes_or_keys_do_not(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    deploy.main(["sign-key", str(tmp_path / "keys")])
    deploy.main(["sign-key", str(tmp_path / "other")])
    app = probe_app(tmp_path / "app")
    hub = tmp_path / "hub"
    deploy.main(["sign", str(app), "--key", str(tmp_path / "keys" / "fab-signing-key"),
                 "--out", str(hub)])  # fmt: skip
    (fab_path,) = hub.glob("*.fab")
    sigs = sorted(hub.glob("*.sig.json"))
    fab = fab_path.read_bytes()
    assert fab == build_fab_from_disk(app)  # the bytes `flwr run app` would send
    trusted = tmp_path / "keys" / "trusted-entities.yaml"
    assert flower_verifies(fab, sigs, trusted)
    assert not flower_verifies(fab, sigs, tmp_path / "other" / "trusted-entities.yaml")
    tampered = bytearray(fab)
    tampered[len(tampered) // 2] ^= 1
    assert not flower_verifies(bytes(tampered), sigs, trusted)
    assert not flower_verifies(fab, [], trusted)  # no signature at all
    # a .fab file signs as itself; a second signer adds its own signature file
    deploy.main(["sign", str(fab_path), "--key", str(tmp_path / "other" / "fab-signing-key"),
                 "--out", str(hub)])  # fmt: skip
    assert len(list(hub.glob("*.fab"))) == 1 and len(list(hub.glob("*.sig.json"))) == 2
    assert flower_verifies(fab, sorted(hub.glob("*.sig.json")), trusted)


@pytest.fixture
def hub_url(tmp_path):
    server = code_trust.make_hub(tmp_path / "hub", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def signed_hub(tmp_path):
    """hub/: probe 1.0.0 and 1.1.0 signed, 2.0.0 unsigned; returns its files."""
    deploy.main(["sign-key", str(tmp_path / "keys")])
    key = str(tmp_path / "keys" / "fab-signing-key")
    hub = tmp_path / "hub"
    for version in ("1.0.0", "1.1.0"):
        app = probe_app(tmp_path / f"app-{version}", version, f"version = {version!r}\n")
        deploy.main(["sign", str(app), "--key", key, "--out", str(hub)])
    from flwr.cli.build import build_fab_from_disk

    unsigned = build_fab_from_disk(probe_app(tmp_path / "app-2.0.0", "2.0.0"))
    (hub / "fedkd.probe.2.0.0.unsigned.fab").write_bytes(unsigned)
    return hub


def test_hub_answers_flowers_hub_client(signed_hub, hub_url):
    """The SuperLink's own request (flwr.supercore.utils.request_download_link)."""
    import requests
    from flwr.supercore.utils import request_download_link

    fetch = f"{hub_url}/hub/fetch-fab"
    url, verifications, _ = request_download_link("@fedkd/probe", "1.0.0", fetch, "fab_url")
    fab = requests.get(url, timeout=10).content
    assert fab == next(signed_hub.glob("fedkd.probe.1.0.0.*.fab")).read_bytes()
    sig = json.loads(next(signed_hub.glob("fedkd.probe.1.0.0.*.sig.json")).read_text())
    assert verifications == [{k: sig[k] for k in ("public_key_id", "signature", "signed_at")}]
    url, _, _ = request_download_link("@fedkd/probe", None, fetch, "fab_url")
    assert "1.1.0" in url  # no version: the newest signed one, never the unsigned 2.0.0
    with pytest.raises(ValueError, match=r"Available app versions for @fedkd/probe: 1.0.0, 1.1.0"):
        request_download_link("@fedkd/probe", "2.0.0", fetch, "fab_url")  # unsigned: not served
    for path in (
        "/fab/fedkd.probe.2.0.0.unsigned.fab",  # unsigned
        "/fab/../keys/fab-signing-key",
        "/fab/x.sig.json",
        "/etc/passwd",
    ):
        assert requests.get(hub_url + path, timeout=10).status_code == 404
    first = next(signed_hub.glob("fedkd.probe.1.0.0.*.fab"))
    twin = signed_hub / "fedkd.probe.1.0.0.twin.fab"  # two signed FABs for one version
    shutil.copy(first, twin)
    for sig in signed_hub.glob(f"{first.name}.*.sig.json"):
        shutil.copy(sig, signed_hub / sig.name.replace(first.name, twin.name))
    with pytest.raises(ValueError, match=r"409.*ambiguous"):
        request_download_link("@fedkd/probe", "1.0.0", fetch, "fab_url")


def test_sign_refuses_what_is_not_an_app_or_a_key(tmp_path, capsys):
    deploy.main(["sign-key", str(tmp_path / "keys")])
    key = str(tmp_path / "keys" / "fab-signing-key")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.fab").write_bytes(b"not a zip")
    for app, key_path, message in [
        (tmp_path / "empty", key, "cannot build a FAB"),
        (tmp_path / "x.fab", key, "not a Flower app bundle"),
        (tmp_path / "nowhere", key, "neither an app directory nor a .fab file"),
        (tmp_path / "empty", str(tmp_path / "keys" / "trusted-entities.yaml"), "not an OpenSSH"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            deploy.main(["sign", str(app), "--key", key_path, "--out", str(tmp_path / "hub")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


OVERRIDES = (
    "experiment=smoke dataset.synthetic.train_size=600 dataset.synthetic.test_size=200 "
    "proxy.size=100 num_clients=2 clients_per_round=2 rounds=1"
)
UNSUPPORTED = "App verification is not supported by the connected SuperLink"
FAILED = "FAB verification failed: the provided trusted entities could not verify the FAB"


@pytest.mark.slow
def test_trusting_supernodes_run_the_signed_fab_and_refuse_others(tmp_path):
    env = dh.flwr_env(tmp_path)
    certs, keys, hub = tmp_path / "certs", tmp_path / "keys", tmp_path / "hub"
    dh.cli(env, "fedkd-deploy", "certs", str(certs))
    dh.cli(env, "fedkd-deploy", "keys", str(keys), "--nodes", "2")
    dh.cli(env, "fedkd-deploy", "sign-key", str(tmp_path / "signer"))
    dh.cli(env, "fedkd-deploy", "sign", str(dh.ROOT), "--key",
           str(tmp_path / "signer" / "fab-signing-key"), "--out", str(hub))  # fmt: skip
    hub_port = dh.free_port()
    env["FLWR_SUPERGRID_API_URL"] = f"http://127.0.0.1:{hub_port}"  # the SuperLink's "Hub"
    procs = dh.Processes(tmp_path / "logs", env)
    try:
        procs.start("hub", "fedkd-deploy", "hub", str(hub), "--port", str(hub_port))
        dh.wait_until(lambda: "serving" in procs.log("hub"), 60, "the hub")
        link = dh.start_superlink(procs, env, certs, dh.free_port())
        for i in range(2):
            dh.cli(env, "flwr", "supernode", "register", str(keys / f"node-{i}.pub"))
            procs.start(
                f"node{i}", "flower-supernode", "--superlink", link,
                "--port", str(dh.free_port()), "--root-certificates", str(certs / "ca.crt"),
                "--auth-supernode-private-key", str(keys / f"node-{i}"),
                "--trusted-entities", str(tmp_path / "signer" / "trusted-entities.yaml"),
                "--node-config", f'partition-id={i} auth-key="{keys / f"node-{i}"}" '
                f'state-dir="{tmp_path / f"state-{i}"}"',
            )  # fmt: skip
        dh.wait_until(lambda: dh.online_nodes(env) == 2, 120, "two SuperNodes")

        def run(app: str, name: str) -> tuple[str, Path]:
            out = tmp_path / name
            config = f'overrides="{OVERRIDES}" out-dir="{out}"'
            done = subprocess.run(
                [str(dh.BIN / "flwr"), "run", app, "--stream", "--run-config", config],
                capture_output=True, text=True, env=env, cwd=dh.ROOT, timeout=400,
            )  # fmt: skip
            (tmp_path / f"{name}.out").write_text(done.stdout + done.stderr)
            return done.stdout + done.stderr, out

        # the signed FAB, fetched through the hub: both nodes run it
        streamed, out = run("@fedkd/fedkd==0.1.0", "signed")
        (summary_file,) = out.glob("run-*/summary.json")
        summary = json.loads(summary_file.read_text())
        assert (summary["nodes_admitted"], summary["failed"]) == (2, 0), streamed[-3000:]
        assert "fedkd-deploy hub: @fedkd/fedkd==0.1.0" in procs.log("hub")
        for i in range(2):
            assert "verif" not in procs.log(f"node{i}").lower()

        # the same code submitted directly (`flwr run .`): no signature, refused
        streamed, out = run(".", "unsigned")
        assert not list(out.glob("run-*/summary.json")), streamed[-3000:]
        for i in range(2):
            assert UNSUPPORTED in procs.log(f"node{i}")
            assert FAILED not in procs.log(f"node{i}")

        # other code beside the signed FAB's valid signature: refused
        (signed,) = hub.glob("*.fab")
        assert len(list(hub.glob("*.sig.json"))) == 1
        signed.write_bytes(with_planted_module(signed.read_bytes()))  # same name and signature
        streamed, out = run("@fedkd/fedkd==0.1.0", "tampered")
        assert not list(out.glob("run-*/summary.json")), streamed[-3000:]
        for i in range(2):
            assert FAILED in procs.log(f"node{i}")
    finally:
        procs.stop_all()
