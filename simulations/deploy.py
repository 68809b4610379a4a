"""`fedkd-deploy`: the files a real federation needs besides Flower's own commands.

    fedkd-deploy certs  DIR [--host NAME ...]   # CA + SuperLink TLS certificate
    fedkd-deploy keys   DIR --nodes N           # SuperNode key pairs + partition-keys.json
    fedkd-deploy bundle FILE [OVERRIDE ...]     # the proxy bundle devices load
    fedkd-deploy shard  FILE --partition I [OVERRIDE ...]  # a partition as device data
    fedkd-deploy footprint [OVERRIDE ...]       # a device's time and memory per round
    fedkd-deploy sign-key DIR                   # Ed25519 FAB signing key + trusted-entities.yaml
    fedkd-deploy sign APP --key KEY --out DIR   # the FAB `flwr run APP` builds, and its signature
    fedkd-deploy hub DIR [--port P]             # serves DIR's signed FABs to a SuperLink

docs/deployment.md ("Deploy on devices") shows the whole sequence: these files, then
`flower-superlink`, `flwr supernode register`, `flower-supernode` and `flwr run`.
Every file is written atomically; an existing file is never overwritten.
simulations/code_trust.py implements sign-key, sign and hub; docs/code_trust.md
explains them: who can run code on a device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
from pathlib import Path

from fedkd.atomic import write_new
from fedkd.errors import FedKDError
from simulations.cli import run_cli
from simulations.code_trust import PROG, make_sign_key, serve_hub, sign_fab

CERT_DAYS = 365
PARTITION_KEYS = "partition-keys.json"  # public key -> partition (run config partition-keys)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(out: Path, hosts: list[str]) -> list[Path]:
    """A self-signed CA and a SuperLink certificate it signs, valid for `hosts`
    (DNS names or IP addresses). Devices get ca.crt (--root-certificates)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkd CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": _pem_key(ca_key),
        "server.pem": server.public_bytes(pem),
        "server.key": _pem_key(server_key),
    }
    for name in files:  # check all before writing any
        if (out / name).exists():
            raise FedKDError(f"{out / name} exists; remove it or pick another directory")
    for name, data in files.items():
        write_new(out / name, data)
    return [out / name for name in files]


def make_node_keys(out: Path, nodes: int) -> list[Path]:
    """One EC P-384 key pair per SuperNode, in OpenSSH format: `node-<i>` (stays on
    the device: --auth-supernode-private-key, and node config auth-key, which signs
    its partition claim) and `node-<i>.pub` (registered with `flwr supernode
    register`); and `partition-keys.json`, binding node i's public key to partition
    i (run config partition-keys; edit it to bind them otherwise)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedkd.partition_keys import public_key_text

    if nodes < 1:
        raise FedKDError(f"--nodes={nodes} is not allowed: an integer >= 1")
    paths = [out / f"node-{i}{suffix}" for i in range(nodes) for suffix in ("", ".pub")]
    paths.append(out / PARTITION_KEYS)
    for path in paths:
        if path.exists():
            raise FedKDError(f"{path} exists; remove it or pick another directory")
    bindings: dict[str, int] = {}
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = public_key_text(key.public_key())
        write_new(out / f"node-{i}", private)
        (out / f"node-{i}").chmod(0o600)
        write_new(out / f"node-{i}.pub", public.encode() + b"\n")
        bindings[public] = i
    write_new(out / PARTITION_KEYS, (json.dumps(bindings, indent=1) + "\n").encode())
    return paths


def make_bundle(path: Path, overrides: list[str]) -> Path:
    from fedkd.compose import compose_config
    from fedkd.data.device import write_bundle

    if path.exists():
        raise FedKDError(f"{path} exists; remove it or pick another file")
    bundle = write_bundle(compose_config(overrides), path)
    path.chmod(0o644)  # public data, copied to devices
    print(
        f"{path}: {len(bundle.proxy_x)} proxy images {bundle.input_shape}, "
        f"{len(bundle.test_y)} test images, proxy digest {bundle.digest}"
    )
    return path


def make_shard(path: Path, partition: int, overrides: list[str]) -> Path:
    from fedkd.compose import compose_config
    from fedkd.data.device import write_shard

    if path.exists():
        raise FedKDError(f"{path} exists; remove it or pick another file")
    n = write_shard(compose_config(overrides), partition, path)
    print(f"{path}: partition {partition}, {n} labelled images")
    return path


def footprint(
    overrides: list[str], partition: int, rounds: int, threads: int, out: Path | None
) -> None:
    from fedkd.compose import compose_config
    from fedkd.results.recorder import write_json_atomic
    from simulations.footprint import measure

    if rounds < 1 or threads < 1:
        raise FedKDError(f"--rounds={rounds} --threads={threads}: both must be >= 1")
    cfg = compose_config(overrides)
    result = measure(cfg, partition=partition, rounds=rounds, threads=threads)
    print(
        f"student {result['student']}, partition {partition}: "
        f"{result['shard_samples']} private samples, "
        f"{result['proxy_items']} proxy items, {threads} torch thread(s); "
        f"RSS after imports {result['rss_after_imports_mb']:.0f} MB"
    )
    for r in result["rounds"]:
        print(f"round {r['round']}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    if out is not None:
        write_json_atomic(out, result)
        print(f"wrote {out}")


# --- Code trust: FABs signed with an Ed25519 key that SuperNodes trust -------------
# A SuperNode started with `--trusted-entities FILE` runs a run's ClientApp only if
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("dir", type=Path)
    certs.add_argument(
        "--host",
        action="append",
        help="a name or IP address devices use to reach the SuperLink (repeatable; "
        "default: localhost and 127.0.0.1)",
    )
    keys = sub.add_parser("keys", help="SuperNode authentication key pairs and partition-keys.json")
    keys.add_argument("dir", type=Path)
    keys.add_argument("--nodes", type=int, required=True)
    bundle = sub.add_parser("bundle", help="the proxy bundle a device with its own data loads")
    bundle.add_argument("file", type=Path)
    bundle.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedkd-sim")
    shard = sub.add_parser("shard", help="write one partition as a device's own .npz")
    shard.add_argument("file", type=Path)
    shard.add_argument("--partition", type=int, required=True)
    shard.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedkd-sim")
    foot = sub.add_parser("footprint", help="time and peak memory of one device's rounds")
    foot.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedkd-sim")
    foot.add_argument("--partition", type=int, default=0, help="the device's partition")
    foot.add_argument("--rounds", type=int, default=2)
    foot.add_argument("--threads", type=int, default=1, help="torch threads on the device")
    foot.add_argument("--out", type=Path, help="also write the result as JSON")
    skey = sub.add_parser(
        "sign-key", help="an Ed25519 FAB signing key and the trusted-entities.yaml it makes"
    )
    skey.add_argument("dir", type=Path)
    sign = sub.add_parser("sign", help="sign a FAB (or the FAB an app directory builds)")
    sign.add_argument("app", type=Path, help="an app directory (pyproject.toml) or a .fab file")
    sign.add_argument("--key", type=Path, required=True, help="the sign-key private key")
    sign.add_argument("--out", type=Path, required=True, help="where the FAB and signature go")
    hub = sub.add_parser("hub", help="serve signed FABs to a SuperLink, as Flower Hub would")
    hub.add_argument("dir", type=Path, help="the FABs and signatures `sign` wrote")
    hub.add_argument("--host", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=9400)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    # Hydra overrides may follow options (`shard FILE --partition 1 num_clients=2`),
    # which argparse leaves over; anything else left over is an error.
    args, extra = p.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    def run() -> None:
        if args.command == "certs":
            written = make_certs(args.dir, args.host or ["localhost", "127.0.0.1"])
        elif args.command == "keys":
            written = make_node_keys(args.dir, args.nodes)
        elif args.command == "shard":
            written = [make_shard(args.file, args.partition, args.overrides)]
        elif args.command == "footprint":
            footprint(args.overrides, args.partition, args.rounds, args.threads, args.out)
            return
        elif args.command == "sign-key":
            written = make_sign_key(args.dir)
        elif args.command == "sign":
            written = sign_fab(args.app, args.key, args.out)
        elif args.command == "hub":
            serve_hub(args.dir, args.host, args.port)
            return
        else:
            written = [make_bundle(args.file, args.overrides)]
        for path in written:
            print(f"wrote {path}")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
