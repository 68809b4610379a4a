"""`fedkd-deploy`: the files a real federation needs besides Flower's own commands.

    fedkd-deploy certs  DIR [--host NAME ...]   # CA + SuperLink TLS certificate
    fedkd-deploy keys   DIR --nodes N           # SuperNode key pairs + partition-keys.json
    fedkd-deploy bundle FILE [OVERRIDE ...]     # the proxy bundle devices load
    fedkd-deploy shard  FILE --partition I [OVERRIDE ...]  # a partition as device data
    fedkd-deploy footprint [OVERRIDE ...]       # a device's time and memory per round
    fedkd-deploy sign-key DIR                   # Ed25519 FAB signing key + trusted-entities.yaml
    fedkd-deploy sign APP --key KEY --out DIR   # the FAB `flwr run APP` builds, and its signature
    fedkd-deploy hub DIR [--port P]             # serves DIR's signed FABs to a SuperLink

README.md ("Deploy on devices") shows the whole sequence: these files, then
`flower-superlink`, `flwr supernode register`, `flower-supernode` and `flwr run`.
Every file is written atomically; an existing file is never overwritten.
docs/code_trust.md explains sign-key, sign and hub: who can run code on a device.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
from pathlib import Path

from fedkd.atomic import write_atomic
from fedkd.errors import FedKDError
from simulations.cli import run_cli

PROG = "fedkd-deploy"
CERT_DAYS = 365
PARTITION_KEYS = "partition-keys.json"  # public key -> partition (run config partition-keys)


def _write_new(path: Path, data: bytes) -> None:
    if path.exists():
        raise FedKDError(f"{path} exists; remove it or pick another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


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
        _write_new(out / name, data)
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
        _write_new(out / f"node-{i}", private)
        (out / f"node-{i}").chmod(0o600)
        _write_new(out / f"node-{i}.pub", public.encode() + b"\n")
        bindings[public] = i
    _write_new(out / PARTITION_KEYS, (json.dumps(bindings, indent=1) + "\n").encode())
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
# the FAB carries an Ed25519 signature, by a key in FILE, over (signed_at, SHA-256 of
# the FAB bytes) (flwr/supernode/start_client_internal.py, _verify_fab). Flower 1.41
# attaches signatures to a run only when its SuperLink fetches the app from Flower
# Hub (`flwr run @publisher/app==x.y.z`; control_handlers.py, _get_remote_fab), at
# the address FLWR_SUPERGRID_API_URL. `hub` answers those two requests from a local
# folder of FABs and their signatures, so the SuperNode's own, unmodified check runs
# offline. See docs/code_trust.md for what this protects and what it does not.

SIGN_KEY = "fab-signing-key"  # OpenSSH Ed25519 private key: stays with the signer
TRUSTED_ENTITIES = "trusted-entities.yaml"  # flower-supernode --trusted-entities
SIG_SUFFIX = ".sig.json"  # <fab file>.<key id>.sig.json, one per signer
HUB_FETCH = "/hub/fetch-fab"  # the request Flower's SuperLink sends to the Hub
HUB_FABS = "/fab/"


def _key_id(public_key) -> str:
    """A signing key's id in Flower's documented form `fpk_<UUID>` (exit code 304's
    page), derived from the key itself: the same key always has the same id."""
    import hashlib
    import uuid

    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fpk_{uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16])}"


def make_sign_key(out: Path) -> list[Path]:
    """An Ed25519 key pair to sign FABs with, in OpenSSH format (`fab-signing-key`,
    mode 0600, and `.pub`), and `trusted-entities.yaml` mapping its id to its public
    key: the file a SuperNode owner passes to `flower-supernode --trusted-entities`."""
    import yaml
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    paths = [out / SIGN_KEY, out / f"{SIGN_KEY}.pub", out / TRUSTED_ENTITIES]
    for path in paths:
        if path.exists():
            raise FedKDError(f"{path} exists; remove it or pick another directory")
    key = ed25519.Ed25519PrivateKey.generate()
    key_id = _key_id(key.public_key())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = f"{public.decode()} {key_id}"
    _write_new(out / SIGN_KEY, private)
    (out / SIGN_KEY).chmod(0o600)
    _write_new(out / f"{SIGN_KEY}.pub", public_line.encode() + b"\n")
    entities = yaml.safe_dump({key_id: public_line}, default_flow_style=False, width=1000)
    _write_new(out / TRUSTED_ENTITIES, entities.encode())
    for public_file in paths[1:]:  # public: copied to every SuperNode owner
        public_file.chmod(0o644)
    print(f"key id {key_id}")
    return paths


def _fab_metadata(fab: bytes) -> tuple[str, str]:
    """(app id '@publisher/name', version) of a FAB, as Flower reads them."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    try:
        fab_id, version = get_metadata_from_config(get_fab_config(fab))
    except Exception as exc:  # a zip without a valid pyproject.toml
        raise FedKDError(f"not a Flower app bundle: {exc}") from exc
    return f"@{fab_id}", version


def sign_fab(app: Path, key_path: Path, out: Path) -> list[Path]:
    """Sign a FAB: `app` is a .fab file, or an app directory, built into exactly the
    bytes `flwr run app` would send (Flower's own builder; its zip dates are fixed).
    Writes the FAB (if built) and `<fab>.<key id>.sig.json` into `out`."""
    import hashlib

    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        load_private_key,
        sign_message,
    )

    try:
        key = load_private_key(key_path)
    except (OSError, ValueError) as exc:
        raise FedKDError(f"{key_path}: not an OpenSSH Ed25519 private key ({exc})") from exc
    if app.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            fab = build_fab_from_disk(app)
        except Exception as exc:  # Flower's builder: a missing or invalid pyproject.toml
            raise FedKDError(f"{app}: cannot build a FAB ({exc})") from exc
    elif app.suffix == ".fab" and app.is_file():
        fab = app.read_bytes()
    else:
        raise FedKDError(f"{app} is neither an app directory nor a .fab file")
    app_id, version = _fab_metadata(fab)
    digest = hashlib.sha256(fab).hexdigest()
    name = f"{app_id[1:].replace('/', '.')}.{version}.{digest[:8]}.fab"
    key_id = _key_id(key.public_key())
    sig_path = out / f"{name}.{key_id}{SIG_SUFFIX}"
    if sig_path.exists():
        raise FedKDError(f"{sig_path} exists; remove it or pick another directory")
    written = []
    fab_path = out / name
    if fab_path.exists():
        if fab_path.read_bytes() != fab:
            raise FedKDError(f"{fab_path} exists with other contents")
    else:
        _write_new(fab_path, fab)
        written.append(fab_path)
    signed_at = int(now().timestamp())
    signature = sign_message(key, create_message_to_sign(bytes.fromhex(digest), signed_at))
    record = {
        "public_key_id": key_id,
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
        "app_id": app_id,
        "app_version": version,
        "fab_sha256": digest,
    }
    _write_new(sig_path, (json.dumps(record, indent=1) + "\n").encode())
    written.append(sig_path)
    print(f"signed {app_id}=={version}, FAB sha256 {digest}, {len(fab)} bytes, key {key_id}")
    return written


def hub_catalog(folder: Path) -> list[dict]:
    """The signed FABs in `folder`: app id, version, file, and their signatures
    (verifications in the form Flower Hub returns them). Unsigned FABs are left out.
    Signatures are not checked here: the SuperNodes check them."""
    entries = []
    for fab_path in sorted(folder.glob("*.fab")):
        verifications = []
        for sig_path in sorted(folder.glob(f"{fab_path.name}.*{SIG_SUFFIX}")):
            try:
                sig = json.loads(sig_path.read_text())
                verifications.append(
                    {k: sig[k] for k in ("public_key_id", "signature", "signed_at")}
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"{PROG} hub: skipping {sig_path}: {exc}")
        if not verifications:
            continue
        try:
            app_id, version = _fab_metadata(fab_path.read_bytes())
        except FedKDError as exc:
            print(f"{PROG} hub: skipping {fab_path}: {exc}")
            continue
        entries.append(
            {"app_id": app_id, "version": version, "file": fab_path.name,
             "verifications": verifications}
        )  # fmt: skip
    return entries


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def make_hub(folder: Path, host: str, port: int):
    """An HTTP server answering what Flower 1.41's SuperLink asks Flower Hub for a
    run of `@publisher/app[==x.y.z]` (POST /hub/fetch-fab: a download URL and the
    signatures) and the download itself (GET /fab/<file>), from `folder`. One signed
    FAB per app and version; two with the same version are refused (409)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if not folder.is_dir():
        raise FedKDError(f"{folder} is not a directory")

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_POST(self) -> None:
            if self.path.rstrip("/") != HUB_FETCH:
                return self._json(404, {"detail": "not found"})
            try:
                size = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(size) or b"{}")
                app_id, version = body["app_id"], body.get("app_version")
            except (ValueError, KeyError, TypeError):
                return self._json(400, {"detail": "expected JSON with app_id"})
            found = [e for e in hub_catalog(folder) if e["app_id"] == app_id]
            if version is None and found:
                version = max((e["version"] for e in found), key=_version_key)
            matches = [e for e in found if e["version"] == version]
            if not matches:
                versions = sorted({e["version"] for e in found}, key=_version_key)
                return self._json(404, {"detail": {"available_app_versions": versions}})
            if len(matches) > 1:
                files = ", ".join(e["file"] for e in matches)
                return self._json(409, {"detail": f"{app_id}=={version} is ambiguous: {files}"})
            entry = matches[0]
            host_, port_ = self.server.server_address[:2]
            url = f"http://{host_}:{port_}{HUB_FABS}{entry['file']}"
            self._json(200, {"fab_url": url, "verifications": entry["verifications"]})
            print(f"{PROG} hub: {app_id}=={version} -> {entry['file']}", flush=True)
            return None

        def do_GET(self) -> None:
            name = self.path[len(HUB_FABS) :] if self.path.startswith(HUB_FABS) else ""
            served = {e["file"] for e in hub_catalog(folder)}
            if name not in served:  # only the catalog's own file names: no paths
                return self._json(404, {"detail": "not found"})
            self._send(200, (folder / name).read_bytes(), "application/octet-stream")
            return None

        def log_message(self, *args) -> None:
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise FedKDError(f"cannot listen on {host}:{port}: {exc}") from exc


def serve_hub(folder: Path, host: str, port: int) -> None:
    server = make_hub(folder, host, port)
    host_, port_ = server.server_address[:2]
    for entry in hub_catalog(folder):
        signers = ", ".join(v["public_key_id"] for v in entry["verifications"])
        print(f"{entry['app_id']}=={entry['version']}: {entry['file']} (signed by {signers})")
    print(
        f"serving {folder} on http://{host_}:{port_}; start the SuperLink with "
        f"FLWR_SUPERGRID_API_URL=http://{host_}:{port_}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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
