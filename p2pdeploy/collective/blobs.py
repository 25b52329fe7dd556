"""Content-addressed blobs: chunks named by their SHA-256, and the manifest that lists them.

A blob (a service bundle, a service's data) is cut into chunks of ``chunk_bytes`` (256 KiB
by default). A chunk is named by the SHA-256 of its bytes; its overlay key is the first 160
bits of that digest (:func:`chunk_key`), so the chunk lives on the nodes closest to its own
content and anyone can check that what they received is what they asked for. The
:class:`Manifest` lists the chunks' full digests in order, with the blob's size and digest;
its encoded bytes are stored as one more chunk, and the key of that chunk is the blob's id.
A reader that holds the id can therefore verify everything it fetches: the manifest against
the id, every chunk against the manifest, and the reassembled blob against its digest.

This is the naming and verification half of persistence (as in CFS and PAST); where chunks
are stored, repaired and fetched is :mod:`p2pdeploy.collective.persistence`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from p2pdeploy.overlay.identity import key_id
from p2pdeploy.wire import DecodeError, decode, encode, message

DEFAULT_CHUNK_BYTES = 256 * 1024
#: Chunks larger than this are refused from peers (a chunk travels as one stream message).
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DIGEST_BYTES = 32


class BlobError(ValueError):
    """A blob or manifest is malformed, or does not match the digest it was fetched by."""


@message(120)
class Manifest:
    """The chunks of one blob, in order, by SHA-256; stored as a chunk whose key is the blob id."""

    size: int
    chunk_bytes: int
    digest: bytes
    chunks: list[bytes]
    #: How many nodes hold each chunk (the blob's replication factor).
    replicas: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.chunk_bytes < 1 or self.replicas < 1:
            raise ValueError("manifest: size must be >= 0, chunk_bytes and replicas >= 1")
        if len(self.digest) != DIGEST_BYTES or any(len(d) != DIGEST_BYTES for d in self.chunks):
            raise ValueError(f"manifest: digests are {DIGEST_BYTES} bytes")
        expected = -(-self.size // self.chunk_bytes)
        if len(self.chunks) != expected:
            raise ValueError(f"manifest: {self.size} bytes in chunks of {self.chunk_bytes} need {expected} chunks")

    def chunk_size(self, index: int) -> int:
        """The length of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_key(data: bytes) -> int:
    """The overlay key of a chunk: the first 160 bits of its SHA-256."""
    return key_id(data)


def key_of_digest(digest: bytes) -> int:
    """The overlay key named by a full SHA-256 digest (the same as :func:`chunk_key` of the data)."""
    return int.from_bytes(digest, "big") >> (8 * DIGEST_BYTES - 160)


@dataclass(frozen=True, slots=True)
class Chunked:
    """A blob cut into chunks: its id, its manifest (and the manifest's bytes) and the chunks."""

    blob_id: int
    manifest: Manifest
    manifest_bytes: bytes
    #: ``(key, data)`` for every chunk, in order; equal chunks appear once per position.
    chunks: list[tuple[int, bytes]]


def split(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, replicas: int = 3) -> Chunked:
    """Cut ``data`` into chunks and build its manifest."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a blob is bytes (got {type(data).__name__})")
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}] (got {chunk_bytes})")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1 (got {replicas})")
    data = bytes(data)
    pieces = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    digests = [sha256(piece) for piece in pieces]
    manifest = Manifest(len(data), chunk_bytes, sha256(data), digests, replicas)
    manifest_bytes = encode(manifest)
    if len(manifest_bytes) > MAX_CHUNK_BYTES:
        raise ValueError(f"a blob of {len(data)} bytes needs a manifest over {MAX_CHUNK_BYTES} bytes; "
                         "raise chunk_bytes")
    chunks = [(key_of_digest(d), piece) for d, piece in zip(digests, pieces, strict=True)]
    return Chunked(chunk_key(manifest_bytes), manifest, manifest_bytes, chunks)


def parse_manifest(blob_id: int, data: bytes) -> Manifest:
    """The manifest stored under ``blob_id``; :class:`BlobError` when it is not one or not that one."""
    if chunk_key(data) != blob_id:
        raise BlobError(f"manifest bytes do not hash to blob {blob_id:040x}")
    manifest = decode(data, limit_bytes=MAX_CHUNK_BYTES)
    if isinstance(manifest, DecodeError) or not isinstance(manifest, Manifest):
        raise BlobError(f"blob {blob_id:040x} does not name a manifest")
    return manifest


def assemble(manifest: Manifest, pieces: list[bytes]) -> bytes:
    """Join verified chunks and check the whole blob against the manifest's digest."""
    data = b"".join(pieces)
    if len(data) != manifest.size or sha256(data) != manifest.digest:
        raise BlobError("the reassembled blob does not match its manifest")
    return data
