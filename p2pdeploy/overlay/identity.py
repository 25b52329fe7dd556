"""Node identity: an Ed25519 key pair whose public key names the node.

The node id is the first 160 bits of SHA-256(public key), so an id cannot be chosen freely
(S/Kademlia's first defence against Sybil placement). Messages that carry authority are
signed with the private key and verified against the public key they name.

Key material comes from the operating system (through ``cryptography``) when a node is
created for real; the simulator derives it from its seed with :meth:`Identity.from_seed` so a
run is reproducible. This module does not generate keys from global randomness by itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pdeploy.wire import ID_BITS

KEY_FILE = "identity.key"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """A key file is missing, unreadable, of the wrong size or too widely readable."""


def node_id_of(public_key: bytes) -> int:
    """The 160-bit node id named by an Ed25519 public key."""
    digest = hashlib.sha256(public_key).digest()
    return int.from_bytes(digest, "big") >> (256 - ID_BITS)


def key_id(data: bytes) -> int:
    """The 160-bit key under which ``data`` (a name or a blob) is placed in the overlay."""
    return int.from_bytes(hashlib.sha256(data).digest(), "big") >> (256 - ID_BITS)


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's key pair, its public key bytes and its id."""

    __slots__ = ("_private", "public_key", "node_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key pair from the operating system's random source."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A key pair derived from 32 seed bytes (the simulator's reproducible identities)."""
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes (got {len(seed)})")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> tuple[Identity, bool]:
        """Load the node's key from ``data_dir``, creating it (mode 0600) on first start.

        Returns the identity and whether it was created now.
        """
        directory = Path(data_dir)
        path = directory / KEY_FILE
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise IdentityError(
                    f"{path}: key file is readable by others (mode {mode:o}); run chmod 600 on it"
                )
            seed = path.read_bytes()
            if len(seed) != 32:
                raise IdentityError(f"{path}: expected a 32-byte Ed25519 key (got {len(seed)} bytes)")
            return cls.from_seed(seed), False
        directory.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, identity.private_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return identity, True

    def __repr__(self) -> str:
        return f"Identity({self.node_id:040x})"
