"""Partitions bound to node keys (deployment): which partition each SuperNode's key
may claim, and the signature that proves a claim.

Sampling is over partition ids, which a node states itself. Without a binding any
registered node can claim any partition; with a `partition-keys` file (written by
`fedkd-deploy keys`: each SuperNode's public key -> its partition) the server sends
each node a fresh nonce, the node signs (nonce, run id, partition id) with the
private key it authenticates to the SuperLink with (node config `auth-key`), and
the server admits it only if the signature verifies and the file gives that key
that partition (fedkd/admission.py). A replayed or forwarded signature fails: the
nonce is new per node and per handshake.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedkd.errors import ConfigError

DOMAIN = b"fedkd partition handshake v1\0"
SIGNATURE = ec.ECDSA(hashes.SHA384())


class Refused(Exception):
    """A handshake reply that does not admit its node; the message says why
    (fedkd/admission.py raises it for every rule, this module for signatures)."""


def challenge(nonce: bytes, run_id: int, partition_id: int) -> bytes:
    """The bytes a node signs: bound to this handshake, this run and this claim."""
    return DOMAIN + struct.pack(">H", len(nonce)) + nonce + struct.pack(">QQ", run_id, partition_id)


def public_key_text(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH text of a public key, without comment (the mapping's key)."""
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode()


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key in OpenSSH (as `fedkd-deploy keys` writes) or PEM format."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"node config auth-key={str(path)!r}: cannot read it ({exc})") from None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = load(data, None)
        except (ValueError, TypeError):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
        break
    raise ValueError(f"node config auth-key={str(path)!r} is not an unencrypted ECDSA private key")


def sign_claim(key_path: str | Path, nonce: bytes, run_id: int, pid: int) -> tuple[str, bytes]:
    """The node's side: its public key and its signature of the server's challenge."""
    key = load_private_key(key_path)
    return public_key_text(key.public_key()), key.sign(challenge(nonce, run_id, pid), SIGNATURE)


def _normalised(text: str) -> str:
    """One spelling per key: parsed and written back (drops comments and spaces)."""
    key = serialization.load_ssh_public_key(text.strip().encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an ECDSA public key")
    return public_key_text(key)


@dataclass(frozen=True)
class PartitionKeys:
    """Which partition each node key may claim (run config `partition-keys`)."""

    by_key: dict[str, int]

    @classmethod
    def load(cls, path: str | Path) -> PartitionKeys:
        """The JSON file `{"<OpenSSH public key>": partition id, ...}`."""
        where = f"{path} must be a JSON object of OpenSSH public key -> partition id"
        try:
            raw = json.loads(Path(path).expanduser().read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("partition-keys", str(path), f"a readable file ({exc})") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError("partition-keys", str(path), where)
        by_key: dict[str, int] = {}
        for text, pid in raw.items():
            try:
                key = _normalised(text)
            except (ValueError, TypeError, IndexError):
                bad = f"{where}; {text[:40]!r}... is not an ECDSA public key"
                raise ConfigError("partition-keys", str(path), bad) from None
            if type(pid) is not int or pid < 0:
                raise ConfigError("partition-keys", str(path), f"{where}; got {pid!r}")
            by_key[key] = pid
        return cls(by_key)

    def verify(self, info: Any, nonce: bytes, run_id: int, pid: int) -> None:
        """Raise Refused unless `info` holds a valid signature by a key bound to `pid`."""
        text, signature = info.get("public-key"), info.get("signature")
        if not isinstance(text, str) or not isinstance(signature, bytes):
            raise Refused("no signed claim (node config auth-key=<its SuperNode key> signs it)")
        try:
            key = serialization.load_ssh_public_key(text.strip().encode())
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError("not ECDSA")
            key.verify(signature, challenge(nonce, run_id, pid), SIGNATURE)
        except (InvalidSignature, ValueError, TypeError, IndexError):
            why = f"its signature of the challenge for partition {pid} does not verify"
            raise Refused(why) from None
        owner = self.by_key.get(public_key_text(key))
        if owner is None:
            raise Refused("its key is not in the partition-keys file")
        if owner != pid:
            raise Refused(f"it claims partition {pid}, but its key is bound to partition {owner}")
