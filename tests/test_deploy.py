"""Deployment pieces without a SuperLink: device data, the proxy bundle, node
settings, the `flwr run` app's config, and `fedkd-deploy` certificates and keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from PIL import Image

from fedkd import app as flwr_app
from fedkd.compose import compose_config
from fedkd.data.device import (
    device_federated_data,
    load_bundle,
    load_device_data,
    write_bundle,
    write_shard,
)
from fedkd.data.federated import federated_data
from fedkd.errors import ConfigError, DataError, FedKDError
from fedkd.partition_keys import PartitionKeys, Refused
from fedkd.protocol import CONFIG, INFO, METRICS, QUERY
from simulations import deploy
from tests.conftest import TINY

OVERRIDES = " ".join(TINY)
SHAPE = (1, 12, 12)


@pytest.fixture
def cfg():
    return compose_config(OVERRIDES)


@pytest.fixture
def bundle(cfg, tmp_path):
    path = tmp_path / "bundle.npz"
    write_bundle(cfg, path)
    return path


def shard_npz(cfg, pid, path):
    write_shard(cfg, pid, path)
    return path


def assert_same_view(a, b, pid):
    xa, ya = a.client_data(pid)
    xb, yb = b.client_data(pid)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a.proxy_x, b.proxy_x)
    assert a.proxy_digest == b.proxy_digest
    for (p, q), (r, s) in zip(a.client_task_tests, b.client_task_tests, strict=True):
        assert torch.equal(p, r) and torch.equal(q, s)


def test_device_npz_gives_the_simulated_clients_view(cfg, bundle, tmp_path):
    path = shard_npz(cfg, 1, tmp_path / "device.npz")
    assert_same_view(federated_data(cfg), device_federated_data(cfg, 1, path, bundle), 1)
    with np.load(path) as z:  # (N, H, W) and (N, H, W, C) images are accepted too
        np.savez(tmp_path / "hw.npz", x=z["x"][:, 0], y=z["y"])
        np.savez(tmp_path / "hwc.npz", x=z["x"].transpose(0, 2, 3, 1), y=z["y"])
    for other in ("hw.npz", "hwc.npz"):
        device = device_federated_data(cfg, 1, tmp_path / other, bundle)
        assert_same_view(federated_data(cfg), device, 1)


def test_device_image_directory_gives_the_same_view(cfg, bundle, tmp_path):
    with np.load(shard_npz(cfg, 2, tmp_path / "d.npz")) as z:
        x, y = z["x"][:, 0], z["y"]
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / str(label) / f"{i:05d}.png")
    device = device_federated_data(cfg, 2, tmp_path / "imgs", bundle)
    xs, ys = device.client_data(2)
    order = np.lexsort((np.arange(len(y)), y))  # directories are read class by class
    xa, ya = federated_data(cfg).client_data(2)
    assert torch.equal(xs, xa[order]) and torch.equal(ys, ya[order])


def test_bundle_damage_is_caught(cfg, bundle, tmp_path):
    with np.load(bundle) as z:
        arrays = dict(z)
    arrays["proxy_x"] = arrays["proxy_x"].copy()
    arrays["proxy_x"][0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(DataError, match="do not match its digest"):
        load_bundle(tmp_path / "tampered.npz")
    del arrays["digest"]
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(DataError, match="lacks digest"):
        load_bundle(tmp_path / "old.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read the bundle"):
        load_bundle(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="cannot read the bundle"):
        load_bundle(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 12, 12), np.uint8)}, "needs arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 12, 12)), "y": np.zeros(4, int)}, "must be uint8"),
        ({"x": np.zeros((4, 10, 10), np.uint8), "y": np.zeros(4, int)}, "expected \\(1, 12, 12\\)"),
        ({"x": np.zeros((4, 12, 12), np.uint8), "y": np.zeros(3, int)}, "one integer label"),
        ({"x": np.zeros((4, 12, 12), np.uint8), "y": np.full(4, 10)}, "labels must lie in 0..9"),
        ({"x": np.zeros((0, 12, 12), np.uint8), "y": np.zeros(0, int)}, "holds no samples"),
    ],
)
def test_bad_device_npz_is_one_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_device_data(tmp_path / "d.npz", SHAPE, 10)


def test_bad_device_directory_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_device_data(tmp_path / "nowhere", SHAPE, 10)
    (tmp_path / "d" / "shirts").mkdir(parents=True)
    with pytest.raises(DataError, match="named by class index"):
        load_device_data(tmp_path / "d", SHAPE, 10)
    (tmp_path / "e" / "3").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_device_data(tmp_path / "e", SHAPE, 10)
    (tmp_path / "e" / "3" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read the image"):
        load_device_data(tmp_path / "e", SHAPE, 10)


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition_id": 0}, "partition_id"),
        ({"num-partitions": 3}, "no partition-id"),
        ({"partition-id": 0, "data-path": "d.npz"}, "bundle"),
    ],
)
def test_bad_node_config_names_the_key(node_config, message):
    with pytest.raises(ConfigError, match=message):
        flwr_app.NodeSettings.parse(node_config)


def context(node_config, overrides=OVERRIDES):
    return Context(
        run_id=7,
        node_id=99,
        node_config=node_config,
        state=RecordDict(),
        run_config={"overrides": overrides},
    )


def query(node_config, overrides=OVERRIDES, nonce=None):
    content = RecordDict()
    if nonce is not None:  # the server's challenge (fedkd.server.discover_partitions)
        content[CONFIG] = ConfigRecord({"want": "partition-id", "nonce": nonce})
    msg = Message(content, dst_node_id=99, message_type=QUERY)
    return flwr_app.client_app(msg, context(node_config, overrides))


def test_flwr_app_node_with_its_own_data_answers_the_handshake(cfg, bundle, tmp_path):
    data = shard_npz(cfg, 1, tmp_path / "device.npz")
    node = {"partition-id": 1, "data-path": str(data), "bundle": str(bundle)}
    node["state-dir"] = str(tmp_path / "state")
    reply = query(node)
    assert not reply.has_error()
    assert reply.content.metric_records[METRICS]["partition-id"] == 1
    assert reply.content.metric_records[METRICS]["num-examples"] == len(np.load(data)["y"])
    assert reply.content.config_records[INFO]["proxy-digest"] == federated_data(cfg).proxy_digest
    assert flwr_app.node_cfg(context(node))["simulation"]["client_state_dir"].endswith("run-7")


def test_a_device_adds_secret_dp_noise_whatever_the_server_asks():
    """Replayable noise is for simulation studies: a SuperNode never lets the
    server's config make the noise that protects its data predictable."""
    replayable = f"{OVERRIDES} privacy=sample privacy.secure_noise=false"
    assert flwr_app.run_cfg(replayable)["privacy"]["secure_noise"] is False
    node_side = flwr_app.node_cfg(context({"partition-id": 1}, replayable))
    assert node_side["privacy"]["secure_noise"] is True


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 1, "data-path": "/nowhere.npz", "bundle": "/b.npz"}, "cannot read"),
        ({"partition-id": 5}, "outside 0..2"),
        ({"partition-id": 1, "num-partitions": 2}, "num-partitions=2"),
    ],
)
def test_flwr_app_node_with_bad_data_or_settings_fails_its_handshake(node_config, message, caplog):
    # Flower returns the exception to the server as an error reply for this node: its
    # type only; what the node read (paths, its settings) stays in the node's log
    with pytest.raises(FedKDError, match="could not serve the query message") as info:
        query(node_config)
    assert message not in str(info.value)
    assert message in caplog.text


def test_flwr_app_run_config_errors_name_the_override():
    with pytest.raises(FedKDError, match="'strategy' names no config of fedkd's own"):
        query({"partition-id": 0}, overrides="strategy=nope")


def test_deploy_certs_and_keys_are_what_flower_loads(tmp_path, capsys):
    from cryptography import x509
    from flwr.cli.supernode.register import try_load_public_key

    deploy.main(["certs", str(tmp_path / "certs"), "--host", "10.0.0.5", "--host", "link.lan"])
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    deploy.main(["keys", str(tmp_path / "keys"), "--nodes", "2"])
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    for i in range(2):
        assert try_load_public_key(tmp_path / "keys" / f"node-{i}.pub")
        load_ssh_private_key((tmp_path / "keys" / f"node-{i}").read_bytes(), None)
    binding = PartitionKeys.load(tmp_path / "keys" / "partition-keys.json").by_key
    pubs = [(tmp_path / "keys" / f"node-{i}.pub").read_text().strip() for i in range(2)]
    assert binding == {pubs[0]: 0, pubs[1]: 1}  # node i's key holds partition i
    before = (tmp_path / "keys" / "node-0").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["keys", str(tmp_path / "keys"), "--nodes", "1"])
    assert exit_info.value.code == 2
    assert "node-0 exists" in capsys.readouterr().err
    assert (tmp_path / "keys" / "node-0").read_bytes() == before  # nothing overwritten


def test_a_node_with_auth_key_signs_its_claim_and_only_its_own_partition_verifies(tmp_path):
    deploy.main(["keys", str(tmp_path / "keys"), "--nodes", "2"])
    keys = PartitionKeys.load(tmp_path / "keys" / "partition-keys.json")
    nonce = bytes(range(32))
    node = {"partition-id": 1, "state-dir": str(tmp_path / "state")}
    unsigned = query(node, nonce=nonce).content.config_records[INFO]
    assert "signature" not in unsigned  # no auth-key: a plain claim, as in simulation
    with pytest.raises(Refused, match="no signed claim"):
        keys.verify(unsigned, nonce, 7, 1)
    own = query({**node, "auth-key": str(tmp_path / "keys" / "node-1")}, nonce=nonce)
    keys.verify(own.content.config_records[INFO], nonce, 7, 1)  # run 7: context()'s
    with pytest.raises(Refused, match="does not verify"):  # replayed in another handshake
        keys.verify(own.content.config_records[INFO], bytes(32), 7, 1)
    impostor = query({**node, "auth-key": str(tmp_path / "keys" / "node-0")}, nonce=nonce)
    with pytest.raises(Refused, match="claims partition 1, but its key is bound to partition 0"):
        keys.verify(impostor.content.config_records[INFO], nonce, 7, 1)
    with pytest.raises(FedKDError, match=r"could not serve the query message \(ValueError"):
        query({**node, "auth-key": str(tmp_path / "nowhere")}, nonce=nonce)


def test_deploy_shard_takes_overrides_after_options(tmp_path, capsys):
    deploy.main(["shard", str(tmp_path / "d.npz"), "--partition", "1", *TINY])
    with np.load(tmp_path / "d.npz") as z:
        assert len(z["y"]) == len(federated_data(compose_config(OVERRIDES)).shards[1])
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["shard", str(tmp_path / "e.npz"), "--partition", "1", "--bogus"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "e.npz").exists()


def test_footprint_runs_a_device_process_with_real_teacher_labels(cfg):
    from simulations.footprint import measure

    result = measure(cfg, partition=1, rounds=2, threads=1)
    assert result["shard_samples"] == len(federated_data(cfg).shards[1])
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert [r["teacher_labels"] for r in result["rounds"]] == [False, True]  # dsfl
    for r in result["rounds"]:
        assert r["seconds"] > 0
        assert r["peak_rss_mb"] >= result["rss_after_imports_mb"] > 0


def test_flwr_server_app_reports_a_bad_override_in_one_line(caplog, tmp_path):
    ctx = Context(
        run_id=3,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": "rounds=0", "out-dir": str(tmp_path)},
    )
    with pytest.raises(SystemExit) as exit_info:
        flwr_app.server_main(None, ctx)
    assert exit_info.value.code == 2
    assert "fedkd: rounds=0 is not allowed: an integer >= 1" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing written for a run that never started


def test_flwr_server_app_refuses_a_bad_max_examples_before_writing(caplog, tmp_path):
    ctx = Context(
        run_id=3,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": OVERRIDES, "out-dir": str(tmp_path), "max-examples": 0},
    )
    with pytest.raises(SystemExit) as exit_info:
        flwr_app.server_main(None, ctx)
    assert exit_info.value.code == 2
    assert "fedkd: max-examples=0 is not allowed: an integer >= 1" in caplog.text
    assert not list(tmp_path.iterdir())
