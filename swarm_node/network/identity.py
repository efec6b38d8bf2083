"""The node's persistent identity: one RSA key that is both its libp2p peer ID and its record-signing key.

The key file uses libp2p's protobuf `PrivateKey` format (what p2pd's `-id` flag reads), so the peer ID
survives restarts. Using the same key for the DHT's `RSASignatureValidator` ties every signed record to the
peer ID: a reader derives the peer ID from the public key in the record's owner marker and checks it
against the peer ID the record claims (libp2p peer-id spec: sha2-256 multihash of the protobuf PublicKey).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm_node.errors import OperatorError


class IdentityError(OperatorError):
    """The identity file cannot be created or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Identity:
    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at `path`, creating it (mode 0400) on first run.

    Raises:
        IdentityError: the directory is not writable or the file is not a libp2p RSA private key.
    """
    path = Path(path)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        except OSError as e:
            raise IdentityError(f"cannot create identity file {path} ({e}); pass --identity-path to a writable place") from None
    try:
        data = path.read_bytes()
        proto = crypto_pb2.PrivateKey.FromString(data)
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        der_key = serialization.load_der_private_key(proto.data, password=None)
        peer_id = PeerID.from_identity(data)
    except OSError as e:
        raise IdentityError(f"cannot read identity file {path} ({e}); fix its permissions or pass another --identity-path") from None
    except Exception as e:
        raise IdentityError(
            f"identity file {path} is not a libp2p RSA private key ({e}); move it away to create a new identity"
        ) from None
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = der_key  # hivemind's wrapper has no public constructor from an existing key
    return Identity(path, key, peer_id)


def peer_id_from_public_key(public_key: bytes) -> PeerID:
    """libp2p peer ID of an RSA public key in hivemind's owner-marker format (OpenSSH `ssh-rsa ...`).

    Raises:
        ValueError: the bytes are not an RSA public key.
    """
    key = RSAPublicKey.from_bytes(public_key)._public_key
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


def lock_identity(path: Path) -> int:
    """Take an exclusive advisory lock next to the identity file, so two local nodes never share one identity.

    Returns the lock fd (keep it open for the node's lifetime).

    Raises:
        IdentityError: another running node holds the identity.
    """
    import fcntl

    try:
        fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as e:
        raise IdentityError(f"cannot create the lock file {path}.lock ({e.strerror}); make its directory writable "
                            "or pass another --identity-path") from None
    try:
        # a POSIX record lock, not flock: forked children (hivemind's DHT process) do not inherit it, so the
        # lock dies with this process even when its children outlive a kill -9
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise IdentityError(
            f"identity {path} is already used by a running node; stop that node or pass another --identity-path"
        ) from None
    return fd
