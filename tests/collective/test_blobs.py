"""Content-addressed blobs: chunking, manifests, and the wire form of the persistence messages."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.collective.blobs import (
    BlobError,
    Manifest,
    assemble,
    chunk_key,
    key_of_digest,
    parse_manifest,
    split,
)
from p2pdeploy.collective.persistence import (
    Accept,
    Accepted,
    ChunkBody,
    FetchChunk,
    FindHolders,
    Holders,
    Prepare,
    Promise,
    StoreChunk,
    Stored,
    StoreRecord,
)
from p2pdeploy.collective.records import ZERO, AcceptorState, Ballot, StoredRecord
from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import sign_record


@settings(max_examples=60)
@given(data=st.binary(max_size=5000), chunk_bytes=st.integers(1, 700))
def test_split_then_assemble_gives_back_the_blob(data, chunk_bytes):
    chunked = split(data, chunk_bytes, replicas=2)
    manifest = parse_manifest(chunked.blob_id, chunked.manifest_bytes)
    assert manifest == chunked.manifest
    assert manifest.size == len(data) and manifest.replicas == 2
    for index, (key, piece) in enumerate(chunked.chunks):
        assert key == chunk_key(piece) == key_of_digest(manifest.chunks[index])
        assert len(piece) == manifest.chunk_size(index)
    assert assemble(manifest, [piece for _, piece in chunked.chunks]) == data


def test_a_chunk_key_is_the_first_160_bits_of_its_sha256():
    data = b"some chunk"
    digest = hashlib.sha256(data).digest()
    assert chunk_key(data) == key_id(data) == int.from_bytes(digest[:20], "big") == key_of_digest(digest)


def test_the_same_content_gives_the_same_blob_id():
    assert split(b"x" * 1000, 100).blob_id == split(b"x" * 1000, 100).blob_id
    assert split(b"x" * 1000, 100).blob_id != split(b"x" * 1000, 200).blob_id


def test_a_manifest_that_does_not_hash_to_the_blob_id_is_refused():
    chunked = split(b"abc" * 100, 64)
    with pytest.raises(BlobError, match="do not hash"):
        parse_manifest(chunked.blob_id ^ 1, chunked.manifest_bytes)
    not_a_manifest = b"plain bytes"
    with pytest.raises(BlobError, match="does not name a manifest"):
        parse_manifest(chunk_key(not_a_manifest), not_a_manifest)


def test_assembling_a_tampered_chunk_is_refused():
    chunked = split(b"abc" * 100, 64)
    pieces = [piece for _, piece in chunked.chunks]
    pieces[1] = b"X" + pieces[1][1:]
    with pytest.raises(BlobError, match="does not match"):
        assemble(chunked.manifest, pieces)


def test_splitting_names_what_was_wrong():
    with pytest.raises(ValueError, match="chunk_bytes must be in"):
        split(b"x", 0)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        split(b"x", 10, replicas=0)
    with pytest.raises(TypeError, match="a blob is bytes"):
        split("text", 10)


def test_a_manifest_with_the_wrong_number_of_chunks_does_not_decode():
    good = Manifest(10, 4, bytes(32), [bytes(32)] * 3, 3)
    raw = wire.encode(good)
    assert wire.decode(raw, limit_bytes=len(raw)) == good
    with pytest.raises(ValueError, match="need 3 chunks"):
        Manifest(10, 4, bytes(32), [bytes(32)] * 2, 3)


def _messages() -> list[object]:
    writer = Identity.from_seed(bytes(range(32)))
    key, item = sign_record(writer, b"name", b"value", 7)
    contacts = [Contact(5, ("127.0.0.1", 7400)), Contact(6, 3)]
    ballot = Ballot(3, 9, 12345)
    return [
        FindHolders(1, 2, key, 0, True, 3),
        Holders(1, 2, contacts, True, 7, item, True),
        Holders(1, 2, [], False),
        FetchChunk(1, 2, key),
        ChunkBody(1, 2, key, b"data" * 400, True),
        StoreChunk(1, 2, key, b"data", 3, 1),
        Stored(1, 2, False, "store is full"),
        StoreRecord(1, 2, key, item, 3, 0),
        Prepare(1, 2, key, ballot),
        Promise(1, 2, True, ballot, ZERO, None, []),
        Promise(1, 2, False, ballot, ballot, item, contacts),
        Accept(1, 2, key, ballot, item, contacts),
        Accepted(1, 2, True, ballot),
        AcceptorState(key, ballot, ballot, item, contacts),
        StoredRecord(key, item, 3),
    ]


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_persistence_messages_survive_the_wire(msg):
    data = wire.encode(msg)
    assert wire.decode(data, limit_bytes=wire.STREAM_LIMIT_BYTES) == msg


def test_persistence_tags_are_in_the_range_of_this_layer():
    for msg in _messages():
        assert 100 <= wire.tag_of(type(msg)) <= 129


def test_a_prepare_with_a_negative_ballot_or_cut_short_is_a_decode_error():
    node = (2).to_bytes(20, "big")
    raw = cbor2.dumps([wire.VERSION, wire.tag_of(Prepare), [1, node, node, [-1, node, 3]]])
    assert isinstance(wire.decode(raw), wire.DecodeError)
    assert isinstance(wire.decode(wire.encode(Accepted(1, 2, True, ZERO))[:-3]), wire.DecodeError)
