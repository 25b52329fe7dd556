"""What replicated persistence sends and reports: its wire messages (tags 100-113) and its events.

The requests and their answers of :class:`~p2pdeploy.collective.persistence.Persistence`: the
holder search (``FindHolders``/``Holders``), chunk transfers, record copies, the CASPaxos
rounds of quorum keys, and the pings between the holders of a key. The events are what the
layer reports to the driver and the layers above. Layouts and tags are the wire format: they
change only with the protocol version.

Here too the :class:`Pin`: a publisher's signature that a chunk is wanted until a wall-clock
time. It travels with every copy of the chunk (``StoreChunk.pin``, and ``StorePin`` alone to a
node that holds the chunk already), so a holder that copies a chunk to another node in repair
carries the publisher's authority with it without holding the publisher's key.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any

from p2pdeploy.collective.records import Ballot
from p2pdeploy.overlay.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item
from p2pdeploy.wire import ID_BYTES, NodeId, message, record

# -- what a key holds, and why a copy moves ---------------------------------------------------

KIND_CHUNK = 0
KIND_RECORD = 1
KIND_QUORUM = 2
KINDS = (KIND_CHUNK, KIND_RECORD, KIND_QUORUM)

PURPOSE_PUBLISH = 0
PURPOSE_REPAIR = 1
PURPOSE_HANDOFF = 2
PURPOSES = ("publish", "repair", "handoff")
#: The most copies the wire format lets a key ask for; a node stores and repairs at most
#: ``PersistenceConfig.max_replicas`` of them.
MAX_REPLICAS = 16

# -- pins -----------------------------------------------------------------------------------

PIN_CONTEXT = b"p2pdeploy pin v1\n"


@record
class Pin:
    """The word of the holder of ``public_key`` that the chunk ``key`` is wanted until
    ``expires_at`` (wall-clock seconds since the epoch). A node keeps and repairs a chunk while it
    holds a pin of it that is signed, unexpired and by a key the node trusts; an unpinned chunk
    is collected after ``PersistenceConfig.unpinned_grace_s``."""

    key: NodeId
    expires_at: int
    public_key: bytes
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return PIN_CONTEXT + self.key.to_bytes(ID_BYTES, "big") + struct.pack(">q", self.expires_at) + self.public_key

    def verifies(self) -> bool:
        """True when the signature is ``public_key``'s over the key and the expiry."""
        if len(self.public_key) != PUBLIC_KEY_BYTES or len(self.signature) != SIGNATURE_BYTES:
            return False
        if not -(1 << 62) < self.expires_at < 1 << 62:
            return False
        return verify(self.public_key, self.signature, self.signed_bytes())


def sign_pin(identity: Identity, key: int, expires_at: int) -> Pin:
    """A pin of ``key`` until ``expires_at`` signed by ``identity``."""
    unsigned = Pin(NodeId(key), expires_at, identity.public_key)
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))

# -- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """The fields every message here starts with: the request's id, which its answer echoes,
    and the sender's node id (the first two fields on the wire)."""

    rpc_id: int
    sender: NodeId


@message(100)
class FindHolders(RpcMessage):
    """Who do you know closest to ``key``, and do you hold it? (``check``: a repair check;
    ``replicas``: the key's replication factor when the asker knows it, else 0)."""

    key: NodeId
    kind: int
    check: bool = False
    replicas: int = 0


@message(101)
class Holders(RpcMessage):
    """The answer: closest contacts, whether the key is held, and for records its sequence
    (and the record itself, so a read needs no second round trip). For a quorum key,
    ``sequence`` is the highest ballot counter promised and ``has`` means a value was accepted."""

    contacts: list[Contact]
    has: bool
    sequence: int = 0
    item: Item | None = None
    check: bool = False


@message(102)
class FetchChunk(RpcMessage):
    key: NodeId


@message(103)
class ChunkBody(RpcMessage):
    key: NodeId
    data: bytes
    found: bool


@message(104)
class StoreChunk(RpcMessage):
    """Keep this copy (``pin``: the publisher's, when the sender holds one)."""

    key: NodeId
    data: bytes
    replicas: int
    purpose: int = PURPOSE_PUBLISH
    pin: Pin | None = None


@message(105)
class Stored(RpcMessage):
    ok: bool
    reason: str = ""


@message(106)
class StoreRecord(RpcMessage):
    key: NodeId
    item: Item
    replicas: int
    purpose: int = PURPOSE_PUBLISH


@message(107)
class Prepare(RpcMessage):
    key: NodeId
    ballot: Ballot


@message(108)
class Promise(RpcMessage):
    ok: bool
    promised: Ballot
    accepted: Ballot
    item: Item | None
    group: list[Contact]
    #: Why a promise was refused other than for a higher ballot (``promised`` is then not above
    #: the ballot asked for), such as this node holding all the promises it keeps for strangers.
    reason: str = ""


@message(109)
class Accept(RpcMessage):
    key: NodeId
    ballot: Ballot
    item: Item
    group: list[Contact]


@message(110)
class Accepted(RpcMessage):
    ok: bool
    promised: Ballot


@message(111)
class HolderPing(RpcMessage):
    """Are you there? (sent to the other holders of this node's keys, see ``watch_interval_s``)."""


@message(112)
class HolderPong(RpcMessage):
    """I am here (the answer to a ``HolderPing``)."""


@message(113)
class StorePin(RpcMessage):
    """A newer pin of a chunk the receiver holds (a publisher's refresh); answered by ``Stored``."""

    key: NodeId
    pin: Pin


REQUESTS = (FindHolders, FetchChunk, StoreChunk, StoreRecord, Prepare, Accept, HolderPing, StorePin)
REPLIES = (Holders, ChunkBody, Stored, Promise, Accepted, HolderPong)

# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobStored:
    query_id: int
    blob_id: int
    size: int
    chunks: int
    #: The fewest copies any of the blob's keys reached (this node's own copy included).
    replicas: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass(frozen=True, slots=True)
class BlobFetched:
    query_id: int
    blob_id: int
    data: bytes | None
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.data is not None


@dataclass(frozen=True, slots=True)
class RecordStored:
    query_id: int
    key: int
    stored: int
    refusals: list[str]


@dataclass(frozen=True, slots=True)
class RecordFound:
    query_id: int
    key: int
    item: Item | None


@dataclass(frozen=True, slots=True)
class QuorumValueAccepted:
    """This node, an acceptor of the quorum key ``key``, accepted ``item`` for the ``group``
    (the layers above learn of the records their node holds: a service's manager)."""

    key: int
    item: Item
    group: list[Contact]


@dataclass(frozen=True, slots=True)
class QuorumFinished:
    """A quorum read, put or compare-and-set ended. ``ok`` with a put or cas: acknowledged.

    ``item`` is the record after the operation (``None``: the key holds nothing); on a failed
    compare-and-set it is the current record, whose ``sequence`` is the version to retry with.
    """

    query_id: int
    key: int
    ok: bool
    item: Item | None
    reason: str = ""

    @property
    def version(self) -> int:
        return self.item.sequence if self.item is not None else 0


@dataclass(frozen=True, slots=True)
class HandedOff:
    """``leave()`` finished: every key this node held went to its next holders (acknowledged or timed out)."""

    query_id: int
    keys: int
    #: Copies the next holders acknowledged (0 when no other live node was found).
    copies: int = 0


@dataclass(frozen=True, slots=True)
class ChunkCorrupted:
    """A stored chunk failed its hash check; the copy was dropped and is being fetched again."""

    key: int


_FIELDS: dict[type, tuple[str, ...]] = {}


def with_rpc_id(template: Any, rpc_id: int) -> Any:
    """``template`` with ``rpc_id`` (the first field of every request here), without
    ``dataclasses.replace``'s per-call introspection."""
    cls = type(template)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))[1:]
    return cls(rpc_id, *[getattr(template, name) for name in names])
