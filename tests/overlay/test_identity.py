"""Node identity: ids are the hash of the public key, signatures verify, a key file's bytes are checked."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.overlay.identity import Identity, IdentityError, node_id_of, verify


@given(seed=st.binary(min_size=32, max_size=32), data=st.binary(max_size=200))
def test_signature_verifies_for_its_key_and_data_only(seed, data):
    identity = Identity.from_seed(seed)
    signature = identity.sign(data)
    assert verify(identity.public_key, signature, data)
    assert not verify(identity.public_key, signature, data + b"!")
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify(identity.public_key, tampered, data)
    other = Identity.from_seed(bytes(31) + b"\x01" if seed != bytes(31) + b"\x01" else bytes(32))
    assert not verify(other.public_key, signature, data)


def test_malformed_keys_and_signatures_do_not_verify():
    identity = Identity.from_seed(bytes(32))
    signature = identity.sign(b"x")
    assert not verify(identity.public_key[:31], signature, b"x")
    assert not verify(identity.public_key, signature[:63], b"x")
    assert not verify(bytes(32), signature, b"x")


def test_node_id_is_the_first_160_bits_of_sha256_of_the_public_key():
    import hashlib

    identity = Identity.from_seed(bytes(range(32)))
    expected = int.from_bytes(hashlib.sha256(identity.public_key).digest()[:20], "big")
    assert identity.node_id == expected == node_id_of(identity.public_key)
    assert identity.node_id < 1 << 160


def test_a_key_file_holds_the_seed_and_names_itself_when_it_does_not():
    identity = Identity.from_seed(bytes(range(32)))
    assert Identity.from_key_file(identity.private_bytes(), "identity.key").node_id == identity.node_id
    with pytest.raises(IdentityError, match=r"^node/identity.key: expected a 32-byte Ed25519 key \(got 5 bytes\)$"):
        Identity.from_key_file(b"short", "node/identity.key")
