"""Replicated persistence: blobs on the r closest nodes, repaired under churn; mutable records.

A :class:`Persistence` layer sits in a node's :class:`~p2pdeploy.core.Stack` next to the
Kademlia overlay and wraps it the way HTTP/3 wraps QUIC: it reads the overlay's views
(``closest_known``, ``node_id``) and sends its own messages to contacts' addresses (wire tags
100-110; 120-122 are the manifest and the stored forms of records and acceptor state).

What it stores, and where (CFS/PAST over Kademlia):

- **chunks** of content-addressed blobs (:mod:`p2pdeploy.collective.blobs`), each on the
  ``replicas`` nodes closest to its key (r = 3 by default; the manifest names r, and each chunk
  carries it). A chunk travels as one large message (TCP in the runtime, the bandwidth model in
  the simulator); every copy received, served or read back is checked against its hash.
- **records** (:mod:`p2pdeploy.collective.records`): ``eventual`` ones on the ``replicas``
  closest nodes, highest sequence wins with read repair; ``quorum`` ones by CASPaxos on a group
  of ``quorum_replicas`` nodes.

Finding the closest nodes: the layer runs its own iterative searches with the overlay's
:class:`~p2pdeploy.overlay.lookup.Lookup` query object, seeded from ``closest_known`` and
driven by its own ``FindHolders`` request, which every node answers with the contacts it knows
closest to the key *and whether it holds the key*. One round trip both routes and tells who has
what, so a fetch can start downloading from the first holder the search meets, a repair check
learns in the same search which of the r closest lack a copy, and the overlay needs no callback.

Repair is a level-triggered reconciler. Every ``repair_interval_s`` a node checks each key it
holds that nobody checked during the interval: it searches for the key's r closest live nodes
and pushes its copy to those that lack one (a node that joined closer to the key receives it
this way: handoff on join), then drops its own copy if it is not among them while they all hold
it (a node back from a long downtime, or one that was displaced). The ``check`` flag of the
search tells the holders it reaches that the key was just checked, so a key costs about one
check per interval however many holders it has. ``leave()`` hands every key to the next
closest nodes before a graceful departure; a crash is repaired by the next check, or sooner:
the holders of a key watch one another (a ``HolderPing`` every ``watch_interval_s`` to each
node this one holds keys with, one per peer whatever the number of keys), and a holder that
stops answering has every key it held with this node checked at once (:meth:`Persistence.peer_gone`),
since under heavy-tailed churn all the holders of a key can leave within one repair interval.
A node that starts with keys in its store (back with its disk) checks them within seconds. A search
asks nodes that failed it before again (they may be back from a reboot with their disk). A
search that meets fewer live nodes than it wanted (the known neighbourhood of the key left)
searches once more as wide as an overlay lookup. The layer reports every peer it hears from or
misses to the overlay (``Kademlia.heard(contact, now)``, ``Kademlia.unreachable(node_id)``), so
its traffic keeps the routing table fresh near the keys it stores.

The local store is the :class:`DurableStore` interface: :class:`MemoryStore` here (the
simulator and unit tests; the simulator keeps it across a crash, as a disk), and
``p2pdeploy.runtime.store_sqlite.SQLiteStore`` on a real node (SQLite for the index, records
and acceptor state, one file per chunk named by its hash), so a restarted node serves what it held.

Not here: deciding which blobs a node should cache (the deployer asks with ``keep=True``), and
moving quorum groups when their members leave for good (see ``records.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from p2pdeploy.collective.blobs import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    BlobError,
    Chunked,
    Manifest,
    assemble,
    chunk_key,
    key_of_digest,
    parse_manifest,
    sha256,
    split,
)
from p2pdeploy.collective.records import (
    DEFAULT_MAX_RECORD_BYTES,
    ZERO,
    AcceptorState,
    Ballot,
    Change,
    check_group,
    check_record,
    majority,
    newer,
    on_accept,
    on_prepare,
)
from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.lookup import CandidateState, Lookup
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, record_key
from p2pdeploy.wire import NodeId, message

# -- what a key holds, and why a copy moves ---------------------------------------------------

KIND_CHUNK = 0
KIND_RECORD = 1
KIND_QUORUM = 2
KINDS = (KIND_CHUNK, KIND_RECORD, KIND_QUORUM)

PURPOSE_PUBLISH = 0
PURPOSE_REPAIR = 1
PURPOSE_HANDOFF = 2
PURPOSES = ("publish", "repair", "handoff")
MAX_REPLICAS = 16

# -- messages -------------------------------------------------------------------------------


@message(100)
@dataclass(frozen=True, slots=True)
class FindHolders:
    """Who do you know closest to ``key``, and do you hold it? (``check``: a repair check;
    ``replicas``: the key's replication factor when the asker knows it, else 0)."""

    rpc_id: int
    sender: NodeId
    key: NodeId
    kind: int
    check: bool = False
    replicas: int = 0


@message(101)
@dataclass(frozen=True, slots=True)
class Holders:
    """The answer: closest contacts, whether the key is held, and for records its sequence
    (and the record itself, so a read needs no second round trip). For a quorum key,
    ``sequence`` is the highest ballot counter promised and ``has`` means a value was accepted."""

    rpc_id: int
    sender: NodeId
    contacts: list[Contact]
    has: bool
    sequence: int = 0
    item: Item | None = None
    check: bool = False


@message(102)
@dataclass(frozen=True, slots=True)
class FetchChunk:
    rpc_id: int
    sender: NodeId
    key: NodeId


@message(103)
@dataclass(frozen=True, slots=True)
class ChunkBody:
    rpc_id: int
    sender: NodeId
    key: NodeId
    data: bytes
    found: bool


@message(104)
@dataclass(frozen=True, slots=True)
class StoreChunk:
    rpc_id: int
    sender: NodeId
    key: NodeId
    data: bytes
    replicas: int
    purpose: int = PURPOSE_PUBLISH


@message(105)
@dataclass(frozen=True, slots=True)
class Stored:
    rpc_id: int
    sender: NodeId
    ok: bool
    reason: str = ""


@message(106)
@dataclass(frozen=True, slots=True)
class StoreRecord:
    rpc_id: int
    sender: NodeId
    key: NodeId
    item: Item
    replicas: int
    purpose: int = PURPOSE_PUBLISH


@message(107)
@dataclass(frozen=True, slots=True)
class Prepare:
    rpc_id: int
    sender: NodeId
    key: NodeId
    ballot: Ballot


@message(108)
@dataclass(frozen=True, slots=True)
class Promise:
    rpc_id: int
    sender: NodeId
    ok: bool
    promised: Ballot
    accepted: Ballot
    item: Item | None
    group: list[Contact]


@message(109)
@dataclass(frozen=True, slots=True)
class Accept:
    rpc_id: int
    sender: NodeId
    key: NodeId
    ballot: Ballot
    item: Item
    group: list[Contact]


@message(110)
@dataclass(frozen=True, slots=True)
class Accepted:
    rpc_id: int
    sender: NodeId
    ok: bool
    promised: Ballot


@message(111)
@dataclass(frozen=True, slots=True)
class HolderPing:
    """Are you there? (sent to the other holders of this node's keys, see ``watch_interval_s``)."""

    rpc_id: int
    sender: NodeId


@message(112)
@dataclass(frozen=True, slots=True)
class HolderPong:
    rpc_id: int
    sender: NodeId


REQUESTS = (FindHolders, FetchChunk, StoreChunk, StoreRecord, Prepare, Accept, HolderPing)
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


# -- the durable local store ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    key: int
    size: int
    replicas: int
    pinned: bool = False


class DurableStore(TypingProtocol):
    """Where a node keeps chunks, records and acceptor state; it outlives a crash of the core.

    Reads of chunks are verified: a copy that no longer hashes to its key is removed, counted
    and listed by :meth:`take_corrupted`, and the read returns ``None``. Writes return a refusal
    reason (``"store is full"``) or ``None``; the quota is ``capacity_bytes``.
    """

    capacity_bytes: int

    def chunk_infos(self) -> list[ChunkInfo]: ...
    def chunk_info(self, key: int) -> ChunkInfo | None: ...
    def read_chunk(self, key: int) -> bytes | None: ...
    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False) -> str | None: ...
    def update_chunk(self, key: int, replicas: int, pinned: bool) -> None: ...
    def delete_chunk(self, key: int) -> None: ...
    def verify_chunk(self, key: int) -> bool: ...
    def take_corrupted(self) -> list[ChunkInfo]: ...
    def used_bytes(self) -> int: ...
    def record_keys(self) -> list[int]: ...
    def read_record(self, key: int) -> tuple[Item, int] | None: ...
    def write_record(self, key: int, item: Item, replicas: int) -> str | None: ...
    def delete_record(self, key: int) -> None: ...
    def read_acceptor(self, key: int) -> AcceptorState | None: ...
    def write_acceptor(self, state: AcceptorState) -> None: ...
    def close(self) -> None: ...


class ChunkBookkeeping:
    """What every store keeps the same way: bytes used, and chunks found corrupted since asked."""

    _corrupted: list[ChunkInfo]
    _used: int

    def read_chunk(self, key: int) -> bytes | None:
        raise NotImplementedError

    def verify_chunk(self, key: int) -> bool:
        return self.read_chunk(key) is not None

    def take_corrupted(self) -> list[ChunkInfo]:
        out, self._corrupted = self._corrupted, []
        return out

    def used_bytes(self) -> int:
        return self._used


class MemoryStore(ChunkBookkeeping):
    """The in-memory :class:`DurableStore` (simulator, unit tests): the same rules, no disk.

    Chunk bytes are kept by reference, so replicas of one chunk in a simulation share memory.
    """

    def __init__(self, capacity_bytes: int = 1 << 40) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 (got {capacity_bytes})")
        self.capacity_bytes = capacity_bytes
        self._chunks: dict[int, tuple[bytes, ChunkInfo]] = {}
        self._records: dict[int, tuple[Item, int]] = {}
        self._acceptors: dict[int, AcceptorState] = {}
        self._corrupted: list[ChunkInfo] = []
        self._used = 0
        self.corruptions = 0

    # chunks
    def chunk_infos(self) -> list[ChunkInfo]:
        return [info for _, info in self._chunks.values()]

    def chunk_info(self, key: int) -> ChunkInfo | None:
        entry = self._chunks.get(key)
        return entry[1] if entry else None

    def read_chunk(self, key: int) -> bytes | None:
        entry = self._chunks.get(key)
        if entry is None:
            return None
        if chunk_key(entry[0]) != key:
            self._corrupt(key)
            return None
        return entry[0]

    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False) -> str | None:
        current = self._chunks.get(key)
        if current is not None:
            info = current[1]
            self._chunks[key] = (current[0], ChunkInfo(key, info.size, max(info.replicas, replicas),
                                                       info.pinned or pinned))
            return None
        if self._used + len(data) > self.capacity_bytes:
            return "store is full"
        self._chunks[key] = (data, ChunkInfo(key, len(data), replicas, pinned))
        self._used += len(data)
        return None

    def update_chunk(self, key: int, replicas: int, pinned: bool) -> None:
        entry = self._chunks.get(key)
        if entry is not None:
            self._chunks[key] = (entry[0], ChunkInfo(key, entry[1].size, replicas, pinned))

    def delete_chunk(self, key: int) -> None:
        entry = self._chunks.pop(key, None)
        if entry is not None:
            self._used -= entry[1].size

    def corrupt(self, key: int) -> None:
        """Flip the bytes of a stored chunk (what a bad disk does), for tests."""
        data, info = self._chunks[key]
        self._chunks[key] = (bytes(b ^ 0xFF for b in data[:16]) + data[16:], info)

    def _corrupt(self, key: int) -> None:
        info = self._chunks[key][1]
        self.delete_chunk(key)
        self._corrupted.append(info)
        self.corruptions += 1

    # records
    def record_keys(self) -> list[int]:
        return list(self._records)

    def read_record(self, key: int) -> tuple[Item, int] | None:
        return self._records.get(key)

    def write_record(self, key: int, item: Item, replicas: int) -> str | None:
        self._records[key] = (item, replicas)
        return None

    def delete_record(self, key: int) -> None:
        self._records.pop(key, None)

    def read_acceptor(self, key: int) -> AcceptorState | None:
        return self._acceptors.get(key)

    def write_acceptor(self, state: AcceptorState) -> None:
        self._acceptors[state.key] = state

    def close(self) -> None:
        pass


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistenceConfig:
    """Tunable parameters (defaults chosen with ``simulations/persistence-churn.toml``)."""

    #: Copies of each chunk and eventual record (a blob may ask for another number).
    replicas: int = 3
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: How often each held key is checked for r live holders.
    repair_interval_s: float = 30.0
    #: How often a node probes the other holders of its keys (those its last check of a key
    #: found, and the nodes that check its keys). One that does not answer within
    #: ``rpc_timeout_s`` is taken for gone and every key it held with this node is checked at
    #: once, instead of at the next repair round: under heavy-tailed churn a key's holders can
    #: all leave within one repair interval. One probe per peer, whatever the number of keys.
    watch_interval_s: float = 5.0
    #: A node that starts with keys in its store (back from a downtime with its disk, perhaps
    #: holding the last copies) checks them this soon after it starts, once the overlay knows
    #: another node, instead of after a random share of ``repair_interval_s``.
    rejoin_check_s: float = 3.0
    #: How often every local chunk is re-read and checked against its hash.
    scrub_interval_s: float = 3600.0
    rpc_timeout_s: float = 2.0
    #: A chunk transfer (queued behind others on a slow link) may take this long.
    transfer_timeout_s: float = 60.0
    #: A leaving node's copy gets this long to be acknowledged before the next node is asked.
    handoff_timeout_s: float = 10.0
    alpha: int = 3
    #: Searches ask this many nodes beyond the r closest (a margin for nodes that just left).
    search_margin: int = 2
    #: Contacts in a ``Holders`` answer.
    reply_contacts: int = 8
    #: Chunks a fetch or a store moves at once.
    window: int = 4
    #: A chunk fetch that found no holder that delivered searches again, up to this many times.
    fetch_searches: int = 2
    #: Repair checks under way at once; the rest wait for the next round.
    max_checks: int = 64
    #: Size of the group of a quorum record (N); R = W = a majority.
    quorum_replicas: int = 3
    quorum_attempts: int = 6
    quorum_backoff_s: float = 0.2
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    def __post_init__(self) -> None:
        require_at_least(self, "persistence.", 1, "replicas", "alpha", "reply_contacts", "window", "fetch_searches",
                         "max_checks", "quorum_replicas", "quorum_attempts")
        if self.replicas > MAX_REPLICAS or self.quorum_replicas > MAX_REPLICAS:
            raise ValueError(f"persistence: replicas and quorum_replicas must be <= {MAX_REPLICAS}")
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"persistence.chunk_bytes must be in [1, {MAX_CHUNK_BYTES}] (got {self.chunk_bytes})")
        require_at_least(self, "persistence.", 0, "search_margin")
        require_positive(self, "persistence.", "repair_interval_s", "watch_interval_s", "rejoin_check_s",
                         "scrub_interval_s", "rpc_timeout_s", "transfer_timeout_s", "handoff_timeout_s",
                         "quorum_backoff_s")


# -- operations -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Rpc:
    rpc_id: int
    contact: Contact
    op_id: int | None
    kind: type


@dataclass(slots=True)
class _Search:
    """An iterative search for the nodes closest to ``key``, recording who holds it."""

    key: int
    kind: int
    check: bool
    replicas: int
    lookup: Lookup
    replies: dict[int, Holders] = field(default_factory=dict)
    #: Nodes that did not answer, over every round of the search.
    failed: dict[int, Contact] = field(default_factory=dict)
    widened: bool = False
    finished: bool = False

    def ranked(self) -> list[Contact]:
        """Nodes that answered, closest first."""
        return [c.contact for c in self.lookup.closest_answered()]

    def closest_seen(self, count: int, own: Contact) -> list[tuple[Contact, bool]]:
        """The ``count`` closest nodes met, with whether each answered (``own`` counts as answered)."""
        met = {c.contact.node_id: (c.contact, True) for c in self.lookup.by_id.values()
               if c.state is CandidateState.answered}
        for node_id, contact in self.failed.items():
            met.setdefault(node_id, (contact, False))
        met[own.node_id] = (own, True)
        return sorted(met.values(), key=lambda pair: pair[0].node_id ^ self.key)[:count]


class _Op:
    """Multi-step work with an id; ``parent`` is the op waiting for this one to finish."""

    def __init__(self, op_id: int, key: int, parent: int | None = None) -> None:
        self.op_id = op_id
        self.key = key
        self.parent = parent
        self.search: _Search | None = None
        self.done = False

    # hooks, overridden by the operations that need them
    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        pass

    def on_search_done(self, p: Persistence, now: float) -> None:
        pass

    def on_reply(self, p: Persistence, rpc: _Rpc, msg: Any, now: float) -> None:
        pass

    def on_timeout(self, p: Persistence, rpc: _Rpc, now: float) -> None:
        pass

    def on_child(self, p: Persistence, child: _Op, now: float) -> None:
        pass

    def on_timer(self, p: Persistence, now: float) -> None:
        pass


class _Place(_Op):
    """Store one chunk or eventual record on the r closest nodes (those that lack it)."""

    def __init__(self, op_id: int, key: int, kind: int, replicas: int, purpose: int, *, data: bytes = b"",
                 item: Item | None = None, parent: int | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.kind = kind
        self.replicas = replicas
        self.purpose = purpose
        self.data = data
        self.item = item
        self.holding = 0
        self.waiting = 0
        self.spares: list[Contact] = []
        self.refusals: list[str] = []

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        ranked = p._rank_with_self(search.ranked(), self.key)
        targets, self.spares = ranked[: self.replicas], ranked[self.replicas :]
        for contact in targets:
            self._place(p, contact, search.replies.get(contact.node_id), now)
        self._maybe_finish(p, now)

    def _place(self, p: Persistence, contact: Contact, reply: Holders | None, now: float) -> None:
        if contact.node_id == p.node_id:
            reason = p._store_locally(self.key, self.kind, self.replicas, data=self.data, item=self.item)
            if reason is None:
                self.holding += 1
            else:
                self.refusals.append(reason)
                self._next_spare(p, now)
            return
        if reply is not None and reply.has and (self.kind == KIND_CHUNK or (
                self.item is not None and reply.item is not None and not newer(self.item, reply.item))):
            self.holding += 1
            return
        self.waiting += 1
        if self.kind == KIND_CHUNK:
            msg: Any = StoreChunk(0, p.node_id, self.key, self.data, self.replicas, self.purpose)
        else:
            assert self.item is not None
            msg = StoreRecord(0, p.node_id, self.key, self.item, self.replicas, self.purpose)
        p._request(contact, msg, self, now)

    def _next_spare(self, p: Persistence, now: float) -> None:
        if self.spares:
            self._place(p, self.spares.pop(0), None, now)

    def on_reply(self, p: Persistence, rpc: _Rpc, msg: Any, now: float) -> None:
        if not isinstance(msg, Stored):
            return
        self.waiting -= 1
        if msg.ok:
            self.holding += 1
        else:
            self.refusals.append(msg.reason)
            self._next_spare(p, now)
        self._maybe_finish(p, now)

    def on_timeout(self, p: Persistence, rpc: _Rpc, now: float) -> None:
        if rpc.kind in (StoreChunk, StoreRecord):
            self.waiting -= 1
            self.refusals.append("timeout")
            self._next_spare(p, now)
            self._maybe_finish(p, now)

    def _maybe_finish(self, p: Persistence, now: float) -> None:
        if self.waiting == 0 and self.search is not None and self.search.finished:
            p._finish(self, now)


class _Fetch(_Op):
    """Fetch one chunk: this node's copy if it verifies, else from holders the search meets."""

    def __init__(self, op_id: int, key: int, digest: bytes | None, parent: int | None = None,
                 *, restore: ChunkInfo | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.digest = digest
        self.restore = restore  # a corrupt local copy being replaced: store the result like it
        self.holders: list[Contact] = []
        self.tried: set[int] = set()
        self.fetching: Contact | None = None
        self.data: bytes | None = None
        self.searches = 1
        #: Copies holders sent that failed their hash check here.
        self.corrupt = 0
        #: Holders that said they held the chunk but had no intact copy to send (a store drops a
        #: copy that fails its hash check when it reads it).
        self.lost = 0

    def verify(self, data: bytes) -> bool:
        if self.digest is not None:
            return sha256(data) == self.digest
        return chunk_key(data) == self.key

    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        if msg.has and contact.node_id not in self.tried:
            self.holders.append(contact)
            self._next(p, now)

    def _next(self, p: Persistence, now: float) -> None:
        if self.fetching is not None or self.done:
            return
        untried = [c for c in self.holders if c.node_id not in self.tried]
        if untried:
            untried.sort(key=lambda c: c.node_id ^ self.key)
            self.fetching = untried[0]
            self.tried.add(untried[0].node_id)
            p._request(untried[0], FetchChunk(0, p.node_id, self.key), self, now)
        elif self.search is not None and self.search.finished:
            if self.searches < p.config.fetch_searches:  # answers lost or late: search once more
                self.searches += 1
                self.holders.clear()
                self.tried.clear()
                p._search(self, KIND_CHUNK, False, p.config.replicas, now)
            else:
                p._finish(self, now)

    def on_search_done(self, p: Persistence, now: float) -> None:
        self._next(p, now)

    def on_reply(self, p: Persistence, rpc: _Rpc, msg: Any, now: float) -> None:
        if not isinstance(msg, ChunkBody):
            return
        self.fetching = None
        if msg.found and msg.key == self.key and self.verify(msg.data):
            self.data = msg.data
            p._finish(self, now)
            return
        if msg.found:
            p.dropped["bad_chunk"] += 1
            self.corrupt += 1
        else:
            self.lost += 1
        self._next(p, now)

    def on_timeout(self, p: Persistence, rpc: _Rpc, now: float) -> None:
        if rpc.kind is FetchChunk:
            self.fetching = None
            self._next(p, now)


class _PutBlob(_Op):
    def __init__(self, op_id: int, chunked: Chunked, replicas: int, keep: bool) -> None:
        super().__init__(op_id, chunked.blob_id)
        self.chunked = chunked
        self.replicas = replicas
        self.keep = keep
        unique = dict(chunked.chunks)
        unique[chunked.blob_id] = chunked.manifest_bytes
        self.queue = list(unique.items())
        self.running = 0
        self.fewest = replicas + 1
        self.failures: list[str] = []

    def start(self, p: Persistence, now: float) -> None:
        if self.keep:
            for key, data in self.queue:
                p.store.write_chunk(key, data, self.replicas, pinned=True)
        self._launch(p, now)

    def _launch(self, p: Persistence, now: float) -> None:
        while self.queue and self.running < p.config.window:
            key, data = self.queue.pop(0)
            self.running += 1
            child = _Place(p._next_id(), key, KIND_CHUNK, self.replicas, PURPOSE_PUBLISH, data=data,
                           parent=self.op_id)
            p._start(child, now)
        if not self.queue and self.running == 0:
            p._finish(self, now)

    def on_child(self, p: Persistence, child: _Op, now: float) -> None:
        assert isinstance(child, _Place)
        self.running -= 1
        self.fewest = min(self.fewest, child.holding)
        if child.holding == 0:
            self.failures.append(f"chunk {child.key:040x}: {', '.join(child.refusals) or 'no node reached'}")
        self._launch(p, now)


class _GetBlob(_Op):
    def __init__(self, op_id: int, blob_id: int, keep: bool) -> None:
        super().__init__(op_id, blob_id)
        self.keep = keep
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""
        self.pieces: dict[int, bytes] = {}  # key -> data
        self.queue: list[tuple[int, bytes]] = []
        self.running = 0
        self.data: bytes | None = None
        self.reason = ""

    def start(self, p: Persistence, now: float) -> None:
        p._start(_Fetch(p._next_id(), self.key, None, parent=self.op_id), now)

    def on_child(self, p: Persistence, child: _Op, now: float) -> None:
        assert isinstance(child, _Fetch)
        if self.done:
            return
        if child.data is None:
            what = "manifest" if self.manifest is None else f"chunk {child.key:040x}"
            self.reason = f"{what} not found"
            if child.corrupt:
                copies = "copy" if child.corrupt == 1 else "copies"
                self.reason += f": hash mismatch ({child.corrupt} {copies} received failed the hash check)"
            elif child.lost:
                nodes = "node" if child.lost == 1 else "nodes"
                self.reason += f" ({child.lost} {nodes} said they held it but had no intact copy)"
            p._finish(self, now)
            return
        if self.manifest is None:
            try:
                self.manifest = parse_manifest(self.key, child.data)
            except BlobError as exc:
                self.reason = str(exc)
                p._finish(self, now)
                return
            self.manifest_bytes = child.data
            wanted = {key_of_digest(d): d for d in self.manifest.chunks}
            self.queue = list(wanted.items())
        else:
            self.running -= 1
            self.pieces[child.key] = child.data
        self._launch(p, now)

    def _launch(self, p: Persistence, now: float) -> None:
        while self.queue and self.running < p.config.window:
            key, digest = self.queue.pop(0)
            self.running += 1
            p._start(_Fetch(p._next_id(), key, digest, parent=self.op_id), now)
            if self.done:
                return
        if not self.queue and self.running == 0:
            manifest = self.manifest
            assert manifest is not None
            try:
                self.data = assemble(manifest, [self.pieces[key_of_digest(d)] for d in manifest.chunks])
            except BlobError as exc:
                self.reason = str(exc)
            else:
                if self.keep:
                    p.store.write_chunk(self.key, self.manifest_bytes, manifest.replicas, pinned=True)
                    for key, data in self.pieces.items():
                        p.store.write_chunk(key, data, manifest.replicas, pinned=True)
            p._finish(self, now)


class _Check(_Op):
    """The repair reconciler for one key this node holds (chunk or eventual record)."""

    def __init__(self, op_id: int, key: int, kind: int, replicas: int, *, leaving: bool = False,
                 parent: int | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.kind = kind
        self.replicas = replicas
        self.leaving = leaving
        #: A hand-off waits for its copies to be acknowledged (or to time out): the node may
        #: stop right after, cutting a transfer still under way. A copy refused or unanswered
        #: goes to the next closest node that lacks the key (a ``spare``) instead.
        self.waiting = 0
        self.acknowledged = 0
        self.ranked: list[Contact] = []
        self.spares: list[Contact] = []
        self.message: Any = None

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        self.ranked = search.ranked() if self.leaving else p._rank_with_self(search.ranked(), self.key)
        targets = self.ranked[: self.replicas]
        if self.kind == KIND_CHUNK:
            self._chunk(p, targets, search, now)
        else:
            self._record(p, targets, search, now)
        if self.waiting == 0:
            p._finish(self, now)

    def _copy(self, p: Persistence, contact: Contact, msg: Any, now: float) -> None:
        if self.leaving:
            self.waiting += 1
            self.message = msg
            p._request(contact, msg, self, now, timeout_s=p.config.handoff_timeout_s)
        else:
            p._request(contact, msg, None, now)

    def _set_spares(self, lacks: Callable[[Contact], bool]) -> None:
        if self.leaving:
            self.spares = [c for c in self.ranked[self.replicas:] if lacks(c)]

    def on_reply(self, p: Persistence, rpc: _Rpc, msg: Any, now: float) -> None:
        if isinstance(msg, Stored):
            self.acknowledged += msg.ok
            self._copied(p, msg.ok, now)

    def on_timeout(self, p: Persistence, rpc: _Rpc, now: float) -> None:
        if rpc.kind in (StoreChunk, StoreRecord):
            self._copied(p, False, now)

    def _copied(self, p: Persistence, ok: bool, now: float) -> None:
        self.waiting -= 1
        if not ok and self.spares:
            p.counters["handoff_spares"] += 1
            self._copy(p, self.spares.pop(0), self.message, now)
        if self.waiting == 0:
            p._finish(self, now)

    def _chunk(self, p: Persistence, targets: list[Contact], search: _Search, now: float) -> None:
        info = p.store.chunk_info(self.key)
        if info is None:
            return
        purpose = PURPOSE_HANDOFF if self.leaving else PURPOSE_REPAIR
        def lacks(c: Contact) -> bool:
            return c.node_id != p.node_id and not (search.replies.get(c.node_id) and search.replies[c.node_id].has)

        lacking = [c for c in targets if lacks(c)]
        self._set_spares(lacks)
        if not self.leaving:
            p._watch(self.key, [c for c in targets if c.node_id != p.node_id], now, reset=True)
        data = p.store.read_chunk(self.key) if lacking else b""  # read (and hash) only to send it
        if data is None:
            p._drain_corrupted(now)
            return
        for contact in lacking:
            p.counters[f"{PURPOSES[purpose]}_chunks"] += 1
            p.counters[f"{PURPOSES[purpose]}_bytes"] += len(data)
            self._copy(p, contact, StoreChunk(0, p.node_id, self.key, data, self.replicas, purpose), now)
        responsible = any(c.node_id == p.node_id for c in targets)
        if not responsible and not lacking and not info.pinned and len(targets) >= self.replicas:
            p.store.delete_chunk(self.key)  # a surplus copy: the r closest all hold the key
            p._peers.pop(self.key, None)
            p.counters["surplus_dropped"] += 1

    def _record(self, p: Persistence, targets: list[Contact], search: _Search, now: float) -> None:
        mine = p.store.read_record(self.key)
        if mine is None:
            return
        item, replicas = mine
        for reply in search.replies.values():  # a newer copy elsewhere replaces ours
            if reply.item is not None and newer(reply.item, item) and check_record(
                    self.key, reply.item, p.config.max_record_bytes) is None:
                item = reply.item
                p.store.write_record(self.key, item, replicas)
        purpose = PURPOSE_HANDOFF if self.leaving else PURPOSE_REPAIR
        def lacks(contact: Contact) -> bool:
            reply = search.replies.get(contact.node_id)
            return contact.node_id != p.node_id and (reply is None or reply.item is None or newer(item, reply.item))

        lacking = [c for c in targets if lacks(c)]
        self._set_spares(lacks)
        if not self.leaving:
            p._watch(self.key, [c for c in targets if c.node_id != p.node_id], now, reset=True)
        for contact in lacking:
            p.counters[f"{PURPOSES[purpose]}_records"] += 1
            self._copy(p, contact, StoreRecord(0, p.node_id, self.key, item, replicas, purpose), now)
        responsible = any(c.node_id == p.node_id for c in targets)
        if not responsible and not lacking and len(targets) >= self.replicas:
            p.store.delete_record(self.key)
            p._peers.pop(self.key, None)
            p.counters["surplus_dropped"] += 1


class _Leave(_Op):
    def __init__(self, op_id: int, keys: list[tuple[int, int, int]]) -> None:
        super().__init__(op_id, 0)
        self.keys = keys
        self.running = 0
        self.copies = 0

    def start(self, p: Persistence, now: float) -> None:
        for key, kind, replicas in self.keys:
            self.running += 1
            p._start(_Check(p._next_id(), key, kind, replicas, leaving=True, parent=self.op_id), now)
        if self.running == 0:
            p._finish(self, now)

    def on_child(self, p: Persistence, child: _Op, now: float) -> None:
        self.running -= 1
        if isinstance(child, _Check):
            self.copies += child.acknowledged
        if self.running == 0:
            p._finish(self, now)


class _GetRecord(_Op):
    def __init__(self, op_id: int, key: int, replicas: int) -> None:
        super().__init__(op_id, key)
        self.replicas = replicas
        self.best: Item | None = None

    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        item = msg.item
        if item is None:
            return
        if check_record(self.key, item, p.config.max_record_bytes) is not None:
            p.dropped["bad_record"] += 1
            return
        if self.best is None or newer(item, self.best):
            self.best = item

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        best = self.best
        if best is not None:  # read repair: the r closest that answered with an older copy get the newest
            for contact in p._rank_with_self(search.ranked(), self.key)[: self.replicas]:
                if contact.node_id == p.node_id:
                    p._store_locally(self.key, KIND_RECORD, self.replicas, item=best)
                    continue
                reply = search.replies.get(contact.node_id)
                if reply is not None and (reply.item is None or newer(best, reply.item)):
                    p.counters["read_repairs"] += 1
                    p._request(contact, StoreRecord(0, p.node_id, self.key, best, self.replicas,
                                                    PURPOSE_REPAIR), None, now)
        p._finish(self, now)


class _Quorum(_Op):
    """One CASPaxos round (retried with a higher ballot on conflict) for a quorum key."""

    def __init__(self, op_id: int, key: int, change: Change, attempts: int) -> None:
        super().__init__(op_id, key)
        self.change = change
        self.attempts_left = attempts
        self.phase = "locate"
        self.ballot = ZERO
        self.highest_seen = 0
        self.candidates: list[Contact] = []  # the N closest that answered the search (and self)
        self.closest_silent = False  # one of the N closest met did not answer
        self.group: list[Contact] | None = None
        self.asked: set[int] = set()
        self.promises: dict[int, Promise] = {}
        self.accepted: set[int] = set()
        self.refused: set[int] = set()
        self.already: Item | None = None
        self.proposal: Item | None = None
        self.proposal_ok = False
        #: Requests of the current attempt: answers to an earlier ballot must not count for this one.
        self.current: set[int] = set()
        self.ok = False
        self.item: Item | None = None
        self.reason = ""

    # -- locate: the search found the key's closest nodes
    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        self.highest_seen = max(self.highest_seen, msg.sequence)

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        size = p.config.quorum_replicas
        closest = search.closest_seen(size, p.contact)
        self.closest_silent = not all(answered for _, answered in closest)
        holders = [c for c in search.ranked() if search.replies[c.node_id].has]
        self.candidates = [c for c, answered in closest if answered]
        for contact in holders:
            if contact not in self.candidates:
                self.candidates.append(contact)
        self._prepare(p, now)

    # -- phase 1
    def _prepare(self, p: Persistence, now: float) -> None:
        self.phase = "prepare"
        self.promises.clear()
        self.accepted.clear()
        self.refused.clear()
        self.asked.clear()
        self.current.clear()
        self.ballot = Ballot(self.highest_seen + 1, p.node_id, p.rng.getrandbits(32))
        self.highest_seen += 1
        targets = self.group if self.group is not None else self.candidates
        for contact in targets:
            self._ask_promise(p, contact, now)
        self._evaluate(p, now)

    def _ask_promise(self, p: Persistence, contact: Contact, now: float) -> None:
        if contact.node_id in self.asked:
            return
        self.asked.add(contact.node_id)
        if contact.node_id == p.node_id:
            self.promises[p.node_id] = p._acceptor_prepare(self.key, self.ballot, 0)
        else:
            p._request(p._fresh(contact), Prepare(0, p.node_id, self.key, self.ballot), self, now)

    def on_reply(self, p: Persistence, rpc: _Rpc, msg: Any, now: float) -> None:
        if rpc.rpc_id not in self.current:
            return  # an answer to an earlier attempt's ballot
        if isinstance(msg, Promise) and self.phase == "prepare":
            if msg.item is not None and check_record(self.key, msg.item, p.config.max_record_bytes) is not None:
                p.dropped["bad_promise"] += 1
                return
            if msg.item is not None and check_group(msg.group) is not None:
                p.dropped["bad_promise"] += 1
                return
            self.promises[msg.sender] = msg
            self._evaluate(p, now)
        elif isinstance(msg, Accepted) and self.phase == "accept":
            self.highest_seen = max(self.highest_seen, msg.promised.counter)
            (self.accepted if msg.ok else self.refused).add(msg.sender)
            self._evaluate(p, now)

    def on_timeout(self, p: Persistence, rpc: _Rpc, now: float) -> None:
        if rpc.rpc_id not in self.current:
            return
        if (rpc.kind is Prepare and self.phase == "prepare") or (rpc.kind is Accept and self.phase == "accept"):
            self.refused.add(rpc.contact.node_id)
            self._evaluate(p, now)

    def _evaluate(self, p: Persistence, now: float) -> None:
        if self.phase == "prepare":
            self._evaluate_promises(p, now)
        elif self.phase == "accept":
            assert self.group is not None
            members = {c.node_id for c in self.group}
            need = majority(len(self.group))
            if len(self.accepted & members) >= need:
                self.ok, self.item = self.proposal_ok, self.proposal
                p._finish(self, now)
            elif len(self.refused & members) > len(self.group) - need:
                self._retry(p, now, "acceptors refused or did not answer")

    def _evaluate_promises(self, p: Persistence, now: float) -> None:
        for promise in self.promises.values():
            self.highest_seen = max(self.highest_seen, promise.promised.counter)
        with_value = [pr for pr in self.promises.values() if pr.accepted != ZERO and pr.item is not None]
        if self.group is None and with_value:
            self.group = list(max(with_value, key=lambda pr: pr.accepted).group)
            for contact in self.group:  # group members the search did not reach
                self._ask_promise(p, contact, now)
        if self.group is None:
            waiting = [c for c in self.candidates if c.node_id not in self.promises and c.node_id not in self.refused]
            if waiting:
                return
            if self.closest_silent or any(c.node_id in self.refused for c in self.candidates):
                self._retry(p, now, "cannot reach the nodes closest to the key")
                return
            if self.change.kind == "read" or (self.change.kind == "cas" and self.change.expected_version != 0):
                self._decide_without_value(p, now)
                return
            self.group = self.candidates[: p.config.quorum_replicas]
        members = {c.node_id for c in self.group}
        granted = [pr for sender, pr in self.promises.items() if sender in members and pr.ok]
        refused = {sender for sender, pr in self.promises.items() if sender in members and not pr.ok}
        refused |= self.refused & members
        need = majority(len(self.group))
        if len(granted) >= need:
            self._accept(p, granted, now)
        elif len(refused) > len(self.group) - need:
            self._retry(p, now, "no majority of the group promised")

    def _decide_without_value(self, p: Persistence, now: float) -> None:
        """Every one of the N closest answered and none holds a value: the key is empty."""
        granted = [pr for pr in self.promises.values() if pr.ok]
        if len(granted) < majority(max(1, len(self.candidates[: p.config.quorum_replicas]))):
            self._retry(p, now, "no majority of the closest nodes promised")
            return
        self.ok, self.item = self.change.kind == "read", None
        if not self.ok:
            self.reason = f"version mismatch: expected {self.change.expected_version}, found 0"
        p._finish(self, now)

    # -- phase 2
    def _accept(self, p: Persistence, granted: list[Promise], now: float) -> None:
        assert self.group is not None
        current_promise = max(granted, key=lambda pr: pr.accepted)
        current = current_promise.item if current_promise.accepted != ZERO else None
        proposal, ok, reason = self.change.apply(current, self.already)
        self.proposal_ok, self.reason = ok, reason
        if proposal is None:  # nothing to make durable: the key is empty
            self.ok, self.item = ok, None
            p._finish(self, now)
            return
        if self.change.kind != "read" and ok and proposal != current:
            self.already = proposal
        self.proposal = proposal
        self.phase = "accept"
        group = list(self.group)
        for contact in group:
            if contact.node_id == p.node_id:
                if p._acceptor_accept(self.key, self.ballot, proposal, group).ok:
                    self.accepted.add(p.node_id)
                else:
                    self.refused.add(p.node_id)
            else:
                p._request(p._fresh(contact), Accept(0, p.node_id, self.key, self.ballot, proposal, group), self, now)
        self._evaluate(p, now)

    def _retry(self, p: Persistence, now: float, reason: str) -> None:
        self.attempts_left -= 1
        if self.attempts_left <= 0:
            self.ok, self.item, self.reason = False, None, f"unavailable: {reason}"
            p._finish(self, now)
            return
        self.phase = "backoff"
        tries = p.config.quorum_attempts - self.attempts_left
        p.set_timer(("op", self.op_id), now + p.rng.uniform(0.5, 1.5) * p.config.quorum_backoff_s * 2 ** tries)

    def on_timer(self, p: Persistence, now: float) -> None:
        if self.phase != "backoff":
            return
        if self.group is None:  # search again: the closest nodes may have come back
            self.phase = "locate"
            p._search(self, KIND_QUORUM, False, p.config.quorum_replicas, now)
        else:
            self._prepare(p, now)


# -- the protocol ---------------------------------------------------------------------------


class Persistence(Protocol):
    """Blobs, records and their repair for one node; see the module docstring."""

    handles = REQUESTS + REPLIES

    def __init__(
        self,
        overlay: Kademlia,
        store: DurableStore,
        rng: Rng,
        now: float,
        *,
        own_address: Address,
        config: PersistenceConfig | None = None,
    ) -> None:
        super().__init__()
        self.overlay = overlay
        self.store = store
        self.rng = rng
        self.config = config or PersistenceConfig()
        self.node_id: int = overlay.node_id
        self.contact = Contact(overlay.node_id, own_address)
        self.counters: Counter[str] = Counter()
        self._rpcs: dict[int, _Rpc] = {}
        self._ops: dict[int, _Op] = {}
        self._next_op = 0
        self._checked_at: dict[int, float] = {}
        #: Per held key, the other nodes that hold it as far as this node knows (its last check
        #: found them, or they checked it here): probed every ``watch_interval_s``.
        self._peers: dict[int, dict[int, Contact]] = {}
        #: Peers probed in the current watch round that have not answered yet.
        self._probing: dict[int, Contact] = {}
        self._watching = False
        #: Keys with a repair check under way (not a hand-off).
        self._checking: set[int] = set()
        #: Set by :meth:`leave`: the node is handing its keys off and takes no new ones.
        self.leaving = False
        c = self.config
        # spread periodic work so nodes started together do not act in lock-step
        if store.chunk_infos() or store.record_keys():  # back with its disk: check what it holds soon
            self.set_timer("repair", now + c.rejoin_check_s * self.rng.uniform(1.0, 1.5))
        else:
            self.set_timer("repair", now + c.repair_interval_s * self.rng.uniform(0.5, 1.5))
        self.set_timer("scrub", now + c.scrub_interval_s * self.rng.uniform(0.5, 1.5))

    # -- API: blobs ------------------------------------------------------------------------
    def put_blob(self, data: bytes, now: float, *, replicas: int | None = None, keep: bool = False) -> int:
        """Store ``data`` as a blob on the ``replicas`` closest nodes of each chunk; emits
        :class:`BlobStored` (its ``blob_id`` is what :meth:`get_blob` takes). With ``keep`` this
        node also keeps a pinned copy (a deployer caching what it deploys)."""
        replicas = self.config.replicas if replicas is None else replicas
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in [1, {MAX_REPLICAS}] (got {replicas})")
        chunked = split(data, self.config.chunk_bytes, replicas)
        op = _PutBlob(self._next_id(), chunked, replicas, keep)
        self._ops[op.op_id] = op
        op.start(self, now)
        return op.op_id

    def get_blob(self, blob_id: int, now: float, *, keep: bool = False) -> int:
        """Fetch the blob ``blob_id`` (every chunk verified); emits :class:`BlobFetched`. With
        ``keep`` this node keeps the chunks pinned and serves them (a node caching a bundle it runs)."""
        _check_key(blob_id, "blob_id")
        op = _GetBlob(self._next_id(), blob_id, keep)
        self._ops[op.op_id] = op
        op.start(self, now)
        return op.op_id

    def unpin(self, blob_id: int) -> None:
        """Stop keeping a blob this node pinned; its copies become ordinary (repaired or dropped)."""
        for key in [blob_id, *self._manifest_keys(blob_id)]:
            info = self.store.chunk_info(key)
            if info is not None and info.pinned:
                self.store.update_chunk(key, info.replicas, False)

    def holds_blob(self, blob_id: int) -> bool:
        """Whether this node's store has the blob's manifest and every chunk (a :meth:`get_blob`
        of it is then served from the store, without asking the network, if they verify)."""
        keys = self._manifest_keys(blob_id)
        if not keys and self.store.chunk_info(blob_id) is None:
            return False
        return all(self.store.chunk_info(key) is not None for key in keys)

    def _manifest_keys(self, blob_id: int) -> list[int]:
        data = self.store.read_chunk(blob_id)
        if data is None:
            return []
        try:
            return [key_of_digest(d) for d in parse_manifest(blob_id, data).chunks]
        except BlobError:
            return []

    # -- API: eventual records ---------------------------------------------------------------
    def put_record(self, item: Item, now: float, *, replicas: int | None = None) -> int:
        """Push a signed record (``storage.sign_record``) to the closest nodes of its key; emits
        :class:`RecordStored`. A reader gets the highest sequence any of them holds."""
        replicas = self.config.replicas if replicas is None else replicas
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in [1, {MAX_REPLICAS}] (got {replicas})")
        if not isinstance(item, Item):
            raise TypeError(f"put_record takes a signed Item (got {type(item).__name__})")
        key = record_key(item.public_key, item.name)
        reason = check_record(key, item, self.config.max_record_bytes)
        if reason is not None:
            raise ValueError(f"cannot put record {item.name!r}: {reason}")
        op = _Place(self._next_id(), key, KIND_RECORD, replicas, PURPOSE_PUBLISH, item=item)
        self._start(op, now)
        return op.op_id

    def get_record(self, key: int, now: float, *, replicas: int | None = None) -> int:
        """The newest record under ``key`` among its closest nodes (stale ones are repaired);
        emits :class:`RecordFound`."""
        _check_key(key, "key")
        op = _GetRecord(self._next_id(), key, self.config.replicas if replicas is None else replicas)
        self._start(op, now)
        return op.op_id

    # -- API: quorum records ---------------------------------------------------------------
    def quorum_read(self, key: int, now: float) -> int:
        """A linearizable read of a quorum record; emits :class:`QuorumFinished`."""
        _check_key(key, "key")
        return self._quorum(key, Change("read"), now)

    def quorum_put(self, identity: Identity, name: bytes, value: bytes, now: float) -> int:
        """Write ``value`` as the next version of the record ``name`` of ``identity``; emits
        :class:`QuorumFinished` (``ok``: acknowledged by a majority of the key's group)."""
        self._check_value(name, value)
        key = record_key(identity.public_key, name)
        return self._quorum(key, Change("put", identity, name, value), now)

    def quorum_cas(self, identity: Identity, name: bytes, expected_version: int, value: bytes, now: float) -> int:
        """Write ``value`` only if the record's version is ``expected_version`` (0: absent)."""
        self._check_value(name, value)
        if expected_version < 0:
            raise ValueError(f"expected_version must be >= 0 (got {expected_version})")
        key = record_key(identity.public_key, name)
        return self._quorum(key, Change("cas", identity, name, value, expected_version), now)

    def _check_value(self, name: bytes, value: bytes) -> None:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError("a record's name and value are bytes")
        if len(value) > self.config.max_record_bytes:
            raise ValueError(f"a record value of {len(value)} bytes is over the limit of "
                             f"{self.config.max_record_bytes}")

    def _quorum(self, key: int, change: Change, now: float) -> int:
        op = _Quorum(self._next_id(), key, change, self.config.quorum_attempts)
        self._ops[op.op_id] = op
        self._search(op, KIND_QUORUM, False, self.config.quorum_replicas, now)
        return op.op_id

    # -- API: leaving ----------------------------------------------------------------------
    def leave(self, now: float) -> int:
        """Before a graceful departure: hand every held key to its next closest nodes; emits
        :class:`HandedOff` once each copy was acknowledged or timed out (quorum groups do not move). From now on the
        node answers no search and accepts no copy, so nobody hands a key to it."""
        keys = [(info.key, KIND_CHUNK, info.replicas) for info in self.store.chunk_infos()]
        for key in self.store.record_keys():
            stored = self.store.read_record(key)
            if stored is not None:
                keys.append((key, KIND_RECORD, stored[1]))
        self.leaving = True
        op = _Leave(self._next_id(), keys)
        self._ops[op.op_id] = op
        op.start(self, now)
        return op.op_id

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is HolderPong:
            if not self._alive(msg.sender, src):
                self.dropped["unsolicited_reply"] += 1
            return
        if kind in REPLIES:
            self._on_reply(src, msg, now)
            return
        self.overlay.heard(Contact(msg.sender, src), now)  # news for the routing table
        if self._probing:
            self._alive(msg.sender, src)
        if kind is HolderPing:
            self.send(src, HolderPong(msg.rpc_id, self.node_id))
            return
        if self.leaving and kind in (FindHolders, StoreChunk, StoreRecord):
            self.dropped["leaving"] += 1  # a departing node takes no new copies: let searches pass it by
            if kind is not FindHolders:  # and say so to a copy, whose sender would wait for a transfer timeout
                self.send(src, Stored(msg.rpc_id, self.node_id, False, "leaving"))
            return
        if kind is FindHolders:
            self.send(src, self._holders(msg, src, now))
        elif kind is FetchChunk:
            data = self.store.read_chunk(msg.key)
            self.send(src, ChunkBody(msg.rpc_id, self.node_id, msg.key, data or b"", data is not None))
            if data is None:
                self._drain_corrupted(now)
            else:
                self.counters["chunks_served"] += 1
        elif kind is StoreChunk or kind is StoreRecord:
            ok, reason = self._accept_chunk(msg) if kind is StoreChunk else self._accept_record(msg)
            self.send(src, Stored(msg.rpc_id, self.node_id, ok, reason))
            if ok and msg.purpose == PURPOSE_REPAIR:  # the repairer holds the key: if it goes, check at once
                self._watch(msg.key, [Contact(msg.sender, src)], now)
        elif kind is Prepare:
            self.send(src, self._acceptor_prepare(msg.key, msg.ballot, msg.rpc_id))
        elif kind is Accept:
            if check_record(msg.key, msg.item, self.config.max_record_bytes) is not None or \
                    check_group(msg.group) is not None:
                self.dropped["bad_accept"] += 1
                return
            self.send(src, self._acceptor_accept(msg.key, msg.ballot, msg.item, msg.group, msg.rpc_id))
        else:
            self.dropped["unexpected"] += 1

    def _holders(self, msg: FindHolders, src: Address, now: float) -> Holders:
        contacts = [c for c in self.overlay.closest_known(msg.key, self.config.reply_contacts + 1)
                    if c.node_id != msg.sender][: self.config.reply_contacts]
        has, sequence, item = False, 0, None
        if msg.kind == KIND_CHUNK:
            info = self.store.chunk_info(msg.key)
            has = info is not None
            if has and msg.replicas > info.replicas and msg.replicas <= MAX_REPLICAS:
                self.store.update_chunk(msg.key, msg.replicas, info.pinned)
        elif msg.kind == KIND_RECORD:
            stored = self.store.read_record(msg.key)
            if stored is not None:
                has, item, sequence = True, stored[0], stored[0].sequence
        elif msg.kind == KIND_QUORUM:
            state = self.store.read_acceptor(msg.key)
            if state is not None:
                has, sequence = state.has_value, state.promised.counter
        else:
            self.dropped["bad_kind"] += 1
        if has and msg.check and self._responsible(msg.key, msg.replicas or self.config.replicas):
            self._checked_at[msg.key] = now  # checked for us; a surplus copy still checks itself, to drop
            # the checker holds the key too (it checks only what it holds): if it goes, check at once
            self._watch(msg.key, [Contact(msg.sender, src)], now)
        return Holders(msg.rpc_id, self.node_id, contacts, has, sequence, item, msg.check)

    def _accept_chunk(self, msg: StoreChunk) -> tuple[bool, str]:
        if not 1 <= msg.replicas <= MAX_REPLICAS or not 0 <= msg.purpose < len(PURPOSES):
            self.dropped["bad_store"] += 1
            return False, "bad replicas or purpose"
        if len(msg.data) > MAX_CHUNK_BYTES or chunk_key(msg.data) != msg.key:
            self.dropped["bad_chunk"] += 1
            return False, "chunk does not hash to its key"
        reason = self.store.write_chunk(msg.key, msg.data, msg.replicas)
        if reason is not None:
            self.counters["store_refused"] += 1
            return False, reason
        self.counters[f"received_{PURPOSES[msg.purpose]}"] += 1
        return True, ""

    def _accept_record(self, msg: StoreRecord) -> tuple[bool, str]:
        if not 1 <= msg.replicas <= MAX_REPLICAS or not 0 <= msg.purpose < len(PURPOSES):
            self.dropped["bad_store"] += 1
            return False, "bad replicas or purpose"
        reason = check_record(msg.key, msg.item, self.config.max_record_bytes)
        if reason is not None:
            self.dropped["bad_record"] += 1
            return False, reason
        reason = self._store_locally(msg.key, KIND_RECORD, msg.replicas, item=msg.item)
        return reason is None, reason or ""

    def _store_locally(self, key: int, kind: int, replicas: int, *, data: bytes = b"",
                       item: Item | None = None) -> str | None:
        if kind == KIND_CHUNK:
            return self.store.write_chunk(key, data, replicas)
        assert item is not None
        current = self.store.read_record(key)
        if current is not None and not newer(item, current[0]):
            if replicas > current[1]:
                self.store.write_record(key, current[0], replicas)
            return None  # we hold this one or a newer one already
        return self.store.write_record(key, item, max(replicas, current[1] if current else 0))

    # -- the acceptor of quorum keys -------------------------------------------------------
    def _acceptor_prepare(self, key: int, ballot: Ballot, rpc_id: int) -> Promise:
        state = self.store.read_acceptor(key) or AcceptorState(key)
        ok, new = on_prepare(state, ballot)
        if ok and new != state:
            self.store.write_acceptor(new)  # durable before the promise leaves
        return Promise(rpc_id, self.node_id, ok, new.promised, new.accepted, new.item, list(new.group))

    def _acceptor_accept(self, key: int, ballot: Ballot, item: Item, group: list[Contact],
                         rpc_id: int = 0) -> Accepted:
        state = self.store.read_acceptor(key) or AcceptorState(key)
        ok, new = on_accept(state, ballot, item, group)
        if ok:
            self.store.write_acceptor(new)
        return Accepted(rpc_id, self.node_id, ok, new.promised)

    # -- replies and timeouts --------------------------------------------------------------
    def _on_reply(self, src: Address, msg: Any, now: float) -> None:
        rpc = self._rpcs.get(msg.rpc_id)
        if rpc is None or rpc.contact.address != src or rpc.contact.node_id != msg.sender:
            self.dropped["unsolicited_reply"] += 1
            return
        del self._rpcs[msg.rpc_id]
        self.overlay.heard(rpc.contact, now)
        if self._probing:
            self._alive(msg.sender, src)
        self.cancel_timer(("rpc", msg.rpc_id))
        if isinstance(msg, Stored) and not msg.ok:
            self.counters["refused"] += 1
        op = self._ops.get(rpc.op_id) if rpc.op_id is not None else None
        if op is None:
            return
        if isinstance(msg, Holders):
            search = op.search
            if search is None or search.finished:
                return
            search.replies[msg.sender] = msg
            contact = rpc.contact
            search.lookup.answered(msg.sender, [c for c in msg.contacts if c.node_id != self.node_id])
            op.on_holder(self, contact, msg, now)
            if not op.done:
                self._advance(op, now)
            return
        op.on_reply(self, rpc, msg, now)

    def _on_rpc_timeout(self, rpc_id: int, now: float) -> None:
        rpc = self._rpcs.pop(rpc_id, None)
        if rpc is None:
            return
        self.counters["timeouts"] += 1
        self.overlay.unreachable(rpc.contact.node_id)
        self.peer_gone(rpc.contact.node_id, now)
        op = self._ops.get(rpc.op_id) if rpc.op_id is not None else None
        if op is None:
            return
        if rpc.kind is FindHolders:
            if op.search is not None and not op.search.finished:
                op.search.lookup.failed(rpc.contact.node_id)
                op.search.failed[rpc.contact.node_id] = rpc.contact
                self._advance(op, now)
            return
        op.on_timeout(self, rpc, now)

    def on_timer(self, name: Hashable, now: float) -> None:
        if isinstance(name, tuple):
            if name[0] == "rpc":
                self._on_rpc_timeout(name[1], now)
            elif name[0] == "op":
                op = self._ops.get(name[1])
                if op is not None:
                    op.on_timer(self, now)
        elif name == "repair":
            self._repair_round(now)
        elif name == "watch":
            self._watch_round(now)
        elif name == "watch-verdict":
            self._watch_verdict(now)
        elif name == "scrub":
            self._scrub(now)
            self.set_timer("scrub", now + self.config.scrub_interval_s)

    # -- repair ----------------------------------------------------------------------------
    def _repair_round(self, now: float) -> None:
        """Check every held key nobody checked during the last interval (bounded per round)."""
        interval = self.config.repair_interval_s
        horizon = now - interval
        if not self.overlay.closest_known(self.node_id, 1) and (self.store.chunk_infos() or self.store.record_keys()):
            self.set_timer("repair", now + self.config.rejoin_check_s)  # not joined yet: nobody to check with
            return
        self._drain_corrupted(now)  # e.g. chunks a restarted store found missing when it opened
        running = sum(1 for op in self._ops.values() if isinstance(op, _Check))
        budget = self.config.max_checks - running
        due: list[tuple[int, int, int]] = []
        chunks = self.store.chunk_infos()
        for info in chunks:
            if self._checked_at.get(info.key, -math.inf) <= horizon:
                due.append((info.key, KIND_CHUNK, info.replicas))
        for key in self.store.record_keys():
            if self._checked_at.get(key, -math.inf) <= horizon:
                stored = self.store.read_record(key)
                if stored is not None:
                    due.append((key, KIND_RECORD, stored[1]))
        held = {info.key for info in chunks} | set(self.store.record_keys())
        for key in [k for k in self._checked_at if k not in held]:
            del self._checked_at[key]
        for key in [k for k in self._peers if k not in held]:
            del self._peers[key]
        for key, kind, replicas in due[: max(0, budget)]:
            self._check(key, kind, replicas, now)
        # a backlog is worked through sooner than the next full interval
        self.set_timer("repair", now + (interval if len(due) <= budget else min(interval, 5.0)))

    def _check(self, key: int, kind: int, replicas: int, now: float) -> None:
        """Start the repair check of a held key (unless one is under way)."""
        self._checked_at[key] = now
        if key in self._checking:
            return
        self._checking.add(key)
        self.counters["checks"] += 1
        self._start(_Check(self._next_id(), key, kind, replicas), now)

    # -- watching the other holders ----------------------------------------------------------
    def peer_gone(self, node_id: int, now: float) -> None:
        """Evidence that ``node_id`` is gone (it did not answer): every key this node holds with
        it is checked now, so its copies are replaced without waiting for the next repair round.
        (A failure detector's verdict may be fed in here too.)"""
        self._probing.pop(node_id, None)
        for key, peers in list(self._peers.items()):
            if peers.pop(node_id, None) is None:
                continue
            info = self.store.chunk_info(key)
            if info is not None:
                kind, replicas = KIND_CHUNK, info.replicas
            else:
                stored = self.store.read_record(key)
                if stored is None:
                    del self._peers[key]
                    continue
                kind, replicas = KIND_RECORD, stored[1]
            if key not in self._checking:
                self.counters["checks_triggered"] += 1
                self._check(key, kind, replicas, now)

    def _watch(self, key: int, contacts: list[Contact], now: float, *, reset: bool = False) -> None:
        """``contacts`` hold ``key`` as this node does: probe them from now on (``reset``: only them)."""
        peers = self._peers.get(key)
        if peers is None or reset:
            peers = self._peers[key] = {}
        for contact in contacts:
            if contact.node_id != self.node_id:
                peers.pop(contact.node_id, None)
                peers[contact.node_id] = contact
        limit = MAX_REPLICAS + self.config.search_margin
        while len(peers) > limit:  # the oldest checkers first
            del peers[next(iter(peers))]
        if peers and not self._watching and not self.leaving:
            self._watching = True
            self.set_timer("watch", now + self.config.watch_interval_s * self.rng.uniform(0.5, 1.0))

    def _watch_round(self, now: float) -> None:
        """Ping every peer that holds a key with this node (once, however many keys)."""
        self._probing.clear()
        if self.leaving:
            self._watching = False
            return
        for peers in self._peers.values():
            for node_id, contact in peers.items():
                self._probing.setdefault(node_id, contact)
        if not self._probing:
            self._watching = False
            return
        for contact in self._probing.values():
            self.send(contact.address, HolderPing(self.rng.getrandbits(63), self.node_id))
        self.counters["probes"] += len(self._probing)
        self.set_timer("watch-verdict", now + self.config.rpc_timeout_s)
        self.set_timer("watch", now + self.config.watch_interval_s)

    def _watch_verdict(self, now: float) -> None:
        silent, self._probing = self._probing, {}
        for node_id in silent:
            self.counters["probes_unanswered"] += 1
            self.overlay.unreachable(node_id)
            self.peer_gone(node_id, now)

    def _alive(self, node_id: int, src: Address) -> bool:
        """A probed peer was heard from (at the address probed): True if it was being probed."""
        contact = self._probing.get(node_id)
        if contact is None or contact.address != src:
            return False
        del self._probing[node_id]
        return True

    def _scrub(self, now: float) -> None:
        for info in self.store.chunk_infos():
            self.store.verify_chunk(info.key)
        self._drain_corrupted(now)

    def _drain_corrupted(self, now: float) -> None:
        """Copies that failed their hash check were dropped by the store: fetch them again."""
        for info in self.store.take_corrupted():
            self.counters["corrupt_chunks"] += 1
            self.emit(ChunkCorrupted(info.key))
            op = _Fetch(self._next_id(), info.key, None, restore=info)
            self._start(op, now)

    # -- searches and requests -------------------------------------------------------------
    def _start(self, op: _Op, now: float) -> None:
        """Register ``op`` and start its search (or serve it from the local store)."""
        self._ops[op.op_id] = op
        if isinstance(op, _Fetch) and op.restore is None:
            data = self.store.read_chunk(op.key)
            if data is not None and op.verify(data):
                op.data = data
                self._finish(op, now)
                return
            self._drain_corrupted(now)
        if isinstance(op, _Place):
            self._search(op, op.kind, False, op.replicas, now, announce=True)
        elif isinstance(op, _Check):
            self._search(op, op.kind, True, op.replicas, now, announce=True)
        elif isinstance(op, _GetRecord):
            self._search(op, KIND_RECORD, False, op.replicas, now)
        elif isinstance(op, _Fetch):
            self._search(op, KIND_CHUNK, False, self.config.replicas, now)

    def _search(self, op: _Op, kind: int, check: bool, replicas: int, now: float, *,
                announce: bool = False) -> None:
        """Search the nodes closest to ``op.key``, asking ``replicas`` plus a margin to answer.
        ``announce``: tell them the key's replication factor (a reader does not know it)."""
        width = replicas + self.config.search_margin
        seeds = self.overlay.closest_known(op.key, 2 * width)
        lookup = Lookup(op.key, seeds, k=width, alpha=self.config.alpha, own_id=self.node_id)
        op.search = _Search(op.key, kind, check, replicas if announce else 0, lookup)
        self._advance(op, now)

    def _advance(self, op: _Op, now: float) -> None:
        search = op.search
        assert search is not None
        request = FindHolders(0, self.node_id, search.key, search.kind, search.check, search.replicas)
        for contact in search.lookup.next_requests():
            self._request(contact, request, op, now)
        if search.lookup.done and not search.lookup.waiting() and not search.finished:
            if self._widen(search):
                self._advance(op, now)
                return
            search.finished = True
            op.on_search_done(self, now)

    def _widen(self, search: _Search) -> bool:
        """Fewer nodes answered than the search wanted: the known neighbourhood of the key is
        mostly gone (churn). Search once more as wide as an overlay lookup (its k), from farther
        contacts too, so nodes that joined near the key since are found; True if it did."""
        lookup = search.lookup
        wide = self.overlay.config.k
        answered = lookup.closest_answered()
        if search.widened or len(answered) >= lookup.k or wide <= lookup.k:
            return False
        search.widened = True
        seeds = [c for c in self.overlay.closest_known(search.key, 2 * wide + len(search.failed))
                 if c.node_id not in search.failed]
        known = {c.node_id for c in seeds}
        seeds += [c.contact for c in answered if c.contact.node_id not in known]
        search.lookup = Lookup(search.key, seeds[: 2 * wide + len(answered)], k=wide, alpha=self.config.alpha,
                               own_id=self.node_id)
        for node_id, reply in search.replies.items():  # no need to ask those again
            search.lookup.answered(node_id, [c for c in reply.contacts if c.node_id != self.node_id
                                             and c.node_id not in search.failed])
        self.counters["searches_widened"] += 1
        return True

    def _request(self, contact: Contact, template: Any, op: _Op | None, now: float,
                 timeout_s: float | None = None) -> None:
        rpc_id = self.rng.getrandbits(63)
        while rpc_id in self._rpcs or rpc_id == 0:
            rpc_id = self.rng.getrandbits(63)
        msg = _with_rpc_id(template, rpc_id)
        self._rpcs[rpc_id] = _Rpc(rpc_id, contact, op.op_id if op is not None else None, type(msg))
        if isinstance(op, _Quorum):
            op.current.add(rpc_id)
        self.send(contact.address, msg)
        if timeout_s is None:
            bulky = type(msg) in (StoreChunk, FetchChunk)
            timeout_s = self.config.transfer_timeout_s if bulky else self.config.rpc_timeout_s
        self.set_timer(("rpc", rpc_id), now + timeout_s)

    def _responsible(self, key: int, replicas: int) -> bool:
        """True when this node is among the ``replicas`` closest to ``key`` that it knows of."""
        known = self.overlay.closest_known(key, replicas)
        return any(c.node_id == self.node_id for c in self._rank_with_self(known, key)[:replicas])

    def _rank_with_self(self, contacts: list[Contact], key: int) -> list[Contact]:
        ranked = [c for c in contacts if c.node_id != self.node_id] + [self.contact]
        ranked.sort(key=lambda c: c.node_id ^ key)
        return ranked

    def _fresh(self, contact: Contact) -> Contact:
        """``contact`` with the address the overlay knows now (a group member may have moved)."""
        known = self.overlay.closest_known(contact.node_id, 1)
        return known[0] if known and known[0].node_id == contact.node_id else contact

    def _next_id(self) -> int:
        self._next_op += 1
        return self._next_op

    def _finish(self, op: _Op, now: float) -> None:
        if op.done:
            return
        op.done = True
        self._ops.pop(op.op_id, None)
        if isinstance(op, _Check) and not op.leaving:
            self._checking.discard(op.key)
        self.cancel_timer(("op", op.op_id))
        if isinstance(op, _Fetch) and op.restore is not None:
            info = op.restore
            if op.data is not None:
                self.store.write_chunk(op.key, op.data, info.replicas, info.pinned)
                self.counters["corrupt_repaired"] += 1
        if op.parent is not None:
            parent = self._ops.get(op.parent)
            if parent is not None:
                parent.on_child(self, op, now)
            return
        if isinstance(op, _PutBlob):
            chunked = op.chunked
            reason = "; ".join(op.failures)
            replicas = min(op.fewest, op.replicas)
            self.emit(BlobStored(op.op_id, chunked.blob_id, chunked.manifest.size, len(chunked.chunks),
                                 replicas, reason))
        elif isinstance(op, _GetBlob):
            self.emit(BlobFetched(op.op_id, op.key, op.data, "" if op.data is not None else op.reason))
        elif isinstance(op, _Place) and op.kind == KIND_RECORD:
            self.emit(RecordStored(op.op_id, op.key, op.holding, op.refusals))
        elif isinstance(op, _GetRecord):
            self.emit(RecordFound(op.op_id, op.key, op.best))
        elif isinstance(op, _Quorum):
            self.emit(QuorumFinished(op.op_id, op.key, op.ok, op.item, op.reason))
        elif isinstance(op, _Leave):
            self.emit(HandedOff(op.op_id, len(op.keys), op.copies))

    def close(self) -> None:
        """Close the store (the driver calls this when the node stops)."""
        self.store.close()

    # -- views -----------------------------------------------------------------------------
    def holds(self, key: int) -> bool:
        """True when this node has a copy of the chunk or record ``key``."""
        return self.store.chunk_info(key) is not None or self.store.read_record(key) is not None

    def operations(self) -> int:
        """Operations under way (searches, transfers, repair checks)."""
        return len(self._ops)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _with_rpc_id(template: Any, rpc_id: int) -> Any:
    """``template`` with ``rpc_id`` (the first field of every request here), without
    ``dataclasses.replace``'s per-call introspection."""
    cls = type(template)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))[1:]
    return cls(rpc_id, *[getattr(template, name) for name in names])


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 1 << 160:
        raise ValueError(f"{what} must be a 160-bit int (got {key!r})")


__all__ = [
    "Accept",
    "Accepted",
    "BlobFetched",
    "BlobStored",
    "ChunkBody",
    "ChunkCorrupted",
    "ChunkInfo",
    "DurableStore",
    "FetchChunk",
    "FindHolders",
    "HandedOff",
    "HolderPing",
    "HolderPong",
    "Holders",
    "MemoryStore",
    "Persistence",
    "PersistenceConfig",
    "Prepare",
    "Promise",
    "QuorumFinished",
    "RecordFound",
    "RecordStored",
    "StoreChunk",
    "StoreRecord",
    "Stored",
]
