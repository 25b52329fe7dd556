"""Node identity: an Ed25519 key pair whose public key names the node.

The node id is the first 160 bits of SHA-256(public key), so an id cannot be chosen freely
(S/Kademlia's first defence against Sybil placement). Messages that carry authority are
signed with the private key and verified against the public key they name.

Key material comes from the operating system (through ``cryptography``) when a node is
created for real; the simulator derives it from its seed with :meth:`Identity.from_seed` so a
run is reproducible. This module does not generate keys from global randomness by itself, and
reads or writes no file: the key file (``DATA_DIR/identity.key``) is :mod:`p2pdeploy.runtime.keyfile`'s.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pdeploy.wire import ID_BITS

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

    @classmethod
    def from_key_file(cls, data: bytes, source: str) -> Identity:
        """The identity whose key file holds ``data`` (its :meth:`private_bytes`); ``source`` names the file."""
        if len(data) != 32:
            raise IdentityError(f"{source}: expected a 32-byte Ed25519 key (got {len(data)} bytes)")
        return cls.from_seed(data)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def __repr__(self) -> str:
        return f"Identity({self.node_id:040x})"
