"""`fedkd-deploy sign-key`, `sign` and `hub`: Flower's own FAB verification
(`flower-supernode --trusted-entities`), made to work offline, so that a device runs
only code a key its owner trusts has signed (docs/code_trust.md).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from fedkd.atomic import write_new
from fedkd.errors import FedKDError

PROG = "fedkd-deploy"  # these are its subcommands

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
    write_new(out / SIGN_KEY, private)
    (out / SIGN_KEY).chmod(0o600)
    write_new(out / f"{SIGN_KEY}.pub", public_line.encode() + b"\n")
    entities = yaml.safe_dump({key_id: public_line}, default_flow_style=False, width=1000)
    write_new(out / TRUSTED_ENTITIES, entities.encode())
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
        write_new(fab_path, fab)
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
    write_new(sig_path, (json.dumps(record, indent=1) + "\n").encode())
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


def hub_entry(folder: Path, app_id: str, version: str | None) -> tuple[int, dict]:
    """The catalog entry a fetch-fab request names, as (200, entry): `version`, or
    the latest one when None. Else the Hub's error as (status, body): 404 with the
    versions there are, 409 when two signed FABs claim the same version (which of
    them a device would run must not be up to file order)."""
    found = [e for e in hub_catalog(folder) if e["app_id"] == app_id]
    if version is None and found:
        version = max((e["version"] for e in found), key=_version_key)
    matches = [e for e in found if e["version"] == version]
    if not matches:
        versions = sorted({e["version"] for e in found}, key=_version_key)
        return 404, {"detail": {"available_app_versions": versions}}
    if len(matches) > 1:
        files = ", ".join(e["file"] for e in matches)
        return 409, {"detail": f"{app_id}=={version} is ambiguous: {files}"}
    return 200, matches[0]


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
            status, entry = hub_entry(folder, app_id, version)
            if status != 200:
                return self._json(status, entry)
            host_, port_ = self.server.server_address[:2]
            url = f"http://{host_}:{port_}{HUB_FABS}{entry['file']}"
            self._json(200, {"fab_url": url, "verifications": entry["verifications"]})
            print(f"{PROG} hub: {app_id}=={entry['version']} -> {entry['file']}", flush=True)
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
