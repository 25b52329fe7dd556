"""Replicated persistence: blobs on the r closest nodes, repaired under churn; mutable records.

A :class:`Persistence` layer sits in a node's :class:`~p2pdeploy.core.Stack` next to the
Kademlia overlay and wraps it the way HTTP/3 wraps QUIC: it reads the overlay's views
(``closest_known``, ``node_id``) and sends its own messages to contacts' addresses (wire tags
100-113; 120-122 are the manifest and the stored forms of records and acceptor state).

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
An overlay lookup (``Kademlia.lookup``) followed by a ``FindHolders`` to each node it found
gives the same nodes one round trip later, for about twice the search messages: 13% more
messages in all on ``simulations/persistence-churn.toml`` (seed 1) and one blob fewer fetched,
17% more and two fewer on its Weibull twin (where one r = 2 blob fewer was lost), no r = 3 blob
lost either way; so the layer keeps its own search. Those runs moved 17-19% fewer chunk bytes,
though, which is worth understanding before trying the overlay's lookup again.

Repair is a level-triggered reconciler. Every ``repair_interval_s`` a node checks each key it
holds that nobody checked during the interval: it searches for the key's r closest live nodes
and pushes its copy to those that lack one (a node that joined closer to the key receives it
this way: handoff on join), then drops its own copy if it is not among them while they all hold
it (a node back from a long downtime, or one that was displaced). The ``check`` flag of the
search tells the holders it reaches that the key was just checked, so a key costs about one
check per interval however many holders it has. ``leave()`` hands every key to the next
closest nodes before a graceful departure; a crash is repaired by the next check, or sooner:
the holders of a key watch one another (a ``HolderPing`` every ``watch_interval_s`` to each
node this one holds keys with, one per peer whatever the number of keys), and when a holder
stops answering, every key it held with this node that is now more than one copy short is
checked at once (:meth:`Persistence.peer_gone`), since under heavy-tailed churn all the holders
of a key can leave within one repair interval. One copy short waits for the next round, as in
Total Recall's lazy repair: the silent holder is often a reboot that comes back with its disk,
and an eager copy would be traffic for nothing (seed 1: repair at r = 3 fell from 49.6 to
34.7 B/node/s on persistence-churn and from 53.7 to 36.8 on its Weibull twin, no blob more lost).
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

The layer is split by job into modules beside this one, and every public name stays importable
from here: ``persistence_messages`` (wire messages and events), ``persistence_store`` (the
durable store), ``persistence_search`` (the holder search), ``persistence_blobs`` (placing and
fetching chunks and eventual records), ``persistence_repair`` (repair checks, the holders' watch,
scrub, hand-off on leave), ``persistence_quorum`` (CASPaxos rounds and the acceptor) and
``persistence_admission`` (who may fill the store: pins signed by trusted keys, quotas for
strangers, the replication cap, the collection of unpinned chunks). This
module holds the configuration and the :class:`Persistence` layer that ties them together: its
API, its inputs, its requests in flight.

Not here: deciding which blobs a node should cache (the deployer asks with ``keep=True``), and
moving quorum groups when their members leave for good (see ``records.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from p2pdeploy.collective.blobs import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    BlobError,
    chunk_key,
    key_of_digest,
    parse_manifest,
    split,
)
from p2pdeploy.collective.persistence_admission import Admission, TrustedKeys
from p2pdeploy.collective.persistence_blobs import Fetch, GetBlob, GetRecord, Place, PutBlob
from p2pdeploy.collective.persistence_messages import (
    KIND_CHUNK,
    KIND_QUORUM,
    KIND_RECORD,
    KINDS,
    MAX_REPLICAS,
    PURPOSE_HANDOFF,
    PURPOSE_PUBLISH,
    PURPOSE_REPAIR,
    PURPOSES,
    REPLIES,
    REQUESTS,
    Accept,
    Accepted,
    BlobFetched,
    BlobStored,
    ChunkBody,
    ChunkCorrupted,
    FetchChunk,
    FindHolders,
    HandedOff,
    HolderPing,
    HolderPong,
    Holders,
    Pin,
    Prepare,
    Promise,
    QuorumFinished,
    QuorumValueAccepted,
    RecordFound,
    RecordStored,
    StoreChunk,
    Stored,
    StorePin,
    StoreRecord,
    sign_pin,
    with_rpc_id,
)
from p2pdeploy.collective.persistence_quorum import QuorumAcceptor, QuorumRound
from p2pdeploy.collective.persistence_repair import Check, Leave, Repair
from p2pdeploy.collective.persistence_search import HolderSearch, Op, Rpc
from p2pdeploy.collective.persistence_store import ChunkBookkeeping, ChunkInfo, DurableStore, MemoryStore
from p2pdeploy.collective.records import (
    DEFAULT_MAX_RECORD_BYTES,
    SERVICE_STATE_PREFIX,
    Change,
    ServiceStateName,
    check_group,
    check_record,
    is_service_state,
    quorum_key,
)
from p2pdeploy.collective.records import ZERO as ZERO_BALLOT
from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, newer, record_key

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
    #: ``rpc_timeout_s`` is taken for gone, and every key it held with this node that is now
    #: more than one copy short is checked at once instead of at the next repair round: under
    #: heavy-tailed churn a key's holders can all leave within one repair interval. One probe
    #: per peer, whatever the number of keys.
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
    #: Rounds a quorum operation tries when acceptors are silent or unreachable...
    quorum_attempts: int = 6
    quorum_backoff_s: float = 0.2
    #: ...while a round lost to another proposer's ballot is tried again until this much time
    #: has passed since the operation began (each wait random, up to ``quorum_backoff_max_s``),
    #: so that many writers of one key take turns instead of failing.
    quorum_contention_s: float = 30.0
    quorum_backoff_max_s: float = 1.0
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    #: The most copies of a key this node stores and repairs: a copy that asks for more is
    #: kept with this many (clamped, and counted), so repair never spreads a key wider; the
    #: local API refuses more.
    max_replicas: int = 5
    #: Bytes of chunks and records not pinned or written by a key this node trusts that one
    #: sender (one writer, for records) may keep here; beyond it a copy is refused with the reason.
    stranger_quota_bytes: int = 4 * 1024 * 1024
    #: Share of ``capacity_bytes`` all such data may take together (whatever the number of
    #: senders, whose ids cost nothing to make); trusted data evicts it when the store is full.
    stranger_share: float = 0.1
    #: An unpinned chunk (no live pin by a trusted key: a stranger's, or one whose pins expired)
    #: is collected this long after it was stored or its last pin expired, and so is an eventual
    #: record by a key this node does not trust after it stored that version (its writer keeps it
    #: by writing a newer one). Collection runs with the repair rounds; chunks this node keeps by
    #: its own choice (``keep``) never are.
    unpinned_grace_s: float = 3600.0
    #: Pins this node signs (its blobs) last this long; a publisher refreshes the pins of the
    #: blobs it keeps when less than half of it is left, and putting a blob again refreshes them.
    pin_ttl_s: float = 7 * 24 * 3600.0
    #: A pin that claims to last longer than this from now is refused.
    max_pin_ttl_s: float = 90 * 24 * 3600.0
    #: The accepted value of a quorum record by a key this node does not trust is collected this
    #: long after this node last promised or accepted on the key (an eventual record by such a
    #: key goes ``unpinned_grace_s`` after this node stored its version). Longer by default:
    #: the state API writes with the node's own key, which the other members of a group need not
    #: trust, and a service's state should outlive a quiet week.
    stranger_quorum_grace_s: float = 30 * 24 * 3600.0
    #: Quorum keys on which one sender may hold a promise here with no accepted value yet (a
    #: ``Prepare`` of a key this node has no state for creates one, durably), and all senders
    #: together; a ``Prepare`` beyond them is refused with the reason. This node's own are not limited;
    #: another node may have as many first writes in flight as its state API takes clients.
    promises_per_sender: int = 256
    max_promises: int = 4096
    #: A promise with no accepted value is forgotten this long after it was given (this node's
    #: promise floor rises to it, see :class:`~p2pdeploy.collective.persistence_quorum.QuorumAcceptor`);
    #: at least twice ``quorum_contention_s``, so no round still running is disturbed.
    promise_grace_s: float = 600.0

    def __post_init__(self) -> None:
        require_at_least(self, "persistence.", 1, "replicas", "alpha", "reply_contacts", "window", "fetch_searches",
                         "max_checks", "quorum_replicas", "quorum_attempts", "max_replicas")
        if self.max_replicas > MAX_REPLICAS:
            raise ValueError(f"persistence.max_replicas must be <= {MAX_REPLICAS} (got {self.max_replicas})")
        if self.replicas > self.max_replicas or self.quorum_replicas > self.max_replicas:
            raise ValueError(f"persistence: replicas and quorum_replicas must be <= max_replicas "
                             f"({self.max_replicas}; got {self.replicas} and {self.quorum_replicas})")
        if not 0 <= self.stranger_share <= 1:
            raise ValueError(f"persistence.stranger_share must be in [0, 1] (got {self.stranger_share})")
        require_at_least(self, "persistence.", 0, "stranger_quota_bytes")
        require_positive(self, "persistence.", "unpinned_grace_s", "pin_ttl_s", "max_pin_ttl_s",
                         "stranger_quorum_grace_s")
        require_at_least(self, "persistence.", 0, "promises_per_sender", "max_promises")
        if self.promise_grace_s < 2 * self.quorum_contention_s:
            raise ValueError(f"persistence.promise_grace_s must be >= 2 * quorum_contention_s "
                             f"({2 * self.quorum_contention_s:g}; got {self.promise_grace_s:g})")
        if self.pin_ttl_s > self.max_pin_ttl_s:
            raise ValueError(f"persistence.pin_ttl_s must be <= max_pin_ttl_s (got {self.pin_ttl_s})")
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"persistence.chunk_bytes must be in [1, {MAX_CHUNK_BYTES}] (got {self.chunk_bytes})")
        require_at_least(self, "persistence.", 0, "search_margin")
        require_positive(self, "persistence.", "repair_interval_s", "watch_interval_s", "rejoin_check_s",
                         "scrub_interval_s", "rpc_timeout_s", "transfer_timeout_s", "handoff_timeout_s",
                         "quorum_backoff_s", "quorum_contention_s", "quorum_backoff_max_s")


class Persistence(HolderSearch, Repair, QuorumAcceptor, Admission, Protocol):
    """Blobs, records and their repair for one node; see the module docstring.

    ``identity`` signs the pins of the blobs this node puts (and its own key is trusted here);
    ``trusted_keys`` are the keys whose pins and records may use the store beyond the quotas
    for strangers (the owner's ``contribution.trusted_keys``); ``wall_clock_offset_s`` turns
    ``now`` into the wall-clock time of pins. See :mod:`~p2pdeploy.collective.persistence_admission`.
    """

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
        identity: Identity | None = None,
        trusted_keys: TrustedKeys = frozenset(),
        wall_clock_offset_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.overlay = overlay
        self.store = store
        self.rng = rng
        self.config = config or PersistenceConfig()
        self.identity = identity
        self.trusted_keys = trusted_keys
        self.wall_clock_offset_s = wall_clock_offset_s
        self._verified: dict[Pin, bool] = {}
        self._usage: Counter[int] | None = None
        self._started_wall = self.wall(now)
        self._pin_news: set[int] = set()
        self.promise_floor = store.read_promise_floor()
        self._promise_only: Counter[int] | None = None
        self._promise_only_total = 0
        self.node_id: int = overlay.node_id
        self.contact = Contact(overlay.node_id, own_address)
        self.counters: Counter[str] = Counter()
        self._rpcs: dict[int, Rpc] = {}
        self._ops: dict[int, Op] = {}
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
    def put_blob(self, data: bytes, now: float, *, replicas: int | None = None, keep: bool = False,
                 signer: Identity | None = None) -> int:
        """Store ``data`` as a blob on the ``replicas`` closest nodes of each chunk; emits
        :class:`BlobStored` (its ``blob_id`` is what :meth:`get_blob` takes). With ``keep`` this
        node also keeps a pinned copy (a deployer caching what it deploys). Every chunk goes with
        a pin signed by ``signer`` (this node's identity by default) for ``pin_ttl_s``: nodes that
        trust that key keep and repair it; the others keep it only within their quotas."""
        replicas = self._replicas(replicas)
        chunked = split(data, self.config.chunk_bytes, replicas)
        signer = signer or self.identity
        keys = [chunked.blob_id, *dict(chunked.chunks)]
        pins = self.sign_pins(signer, keys, now) if signer is not None else {}
        op = PutBlob(self._next_id(), chunked, replicas, keep, pins)
        self._ops[op.op_id] = op
        op.start(self, now)
        return op.op_id

    def get_blob(self, blob_id: int, now: float, *, keep: bool = False) -> int:
        """Fetch the blob ``blob_id`` (every chunk verified); emits :class:`BlobFetched`. With
        ``keep`` this node keeps the chunks pinned and serves them (a node caching a bundle it runs)."""
        _check_key(blob_id, "blob_id")
        op = GetBlob(self._next_id(), blob_id, keep)
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

    def _replicas(self, replicas: int | None) -> int:
        replicas = self.config.replicas if replicas is None else replicas
        if not 1 <= replicas <= self.config.max_replicas:
            raise ValueError(f"replicas must be in [1, {self.config.max_replicas}] (persistence.max_replicas; "
                             f"got {replicas})")
        return replicas

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
        replicas = self._replicas(replicas)
        if not isinstance(item, Item):
            raise TypeError(f"put_record takes a signed Item (got {type(item).__name__})")
        key = record_key(item.public_key, item.name)
        reason = check_record(key, item, self.config.max_record_bytes)
        if reason is not None:
            raise ValueError(f"cannot put record {item.name!r}: {reason}")
        op = Place(self._next_id(), key, KIND_RECORD, replicas, PURPOSE_PUBLISH, item=item)
        self._start(op, now)
        return op.op_id

    def get_record(self, key: int, now: float, *, replicas: int | None = None) -> int:
        """The newest record under ``key`` among its closest nodes (stale ones are repaired);
        emits :class:`RecordFound`."""
        _check_key(key, "key")
        op = GetRecord(self._next_id(), key, self.config.replicas if replicas is None else replicas)
        self._start(op, now)
        return op.op_id

    # -- API: quorum records ---------------------------------------------------------------
    def quorum_read(self, key: int, now: float) -> int:
        """A linearizable read of a quorum record; emits :class:`QuorumFinished`."""
        _check_key(key, "key")
        return self._quorum(key, Change("read"), now)

    def quorum_put(self, identity: Identity, name: bytes, value: bytes, now: float) -> int:
        """Write ``value`` as the next version of the record ``name`` of ``identity``; emits
        :class:`QuorumFinished` (``ok``: acknowledged by a majority of the key's group).

        A service state record (``ServiceStateName(owner, service, key).name``) is the
        service's, not ``identity``'s: it lives under ``shared_record_key(name)`` whoever
        writes it (``records.quorum_key`` gives the key of either kind, for
        :meth:`quorum_read`), and ``identity`` signs the version it writes; acceptors keep it
        only from keys they trust and from the service's owner."""
        self._check_value(name, value)
        key = quorum_key(identity.public_key, name)
        return self._quorum(key, Change("put", identity, name, value), now)

    def quorum_cas(self, identity: Identity, name: bytes, expected_version: int, value: bytes, now: float) -> int:
        """Write ``value`` only if the record's version is ``expected_version`` (0: absent)."""
        self._check_value(name, value)
        if expected_version < 0:
            raise ValueError(f"expected_version must be >= 0 (got {expected_version})")
        key = quorum_key(identity.public_key, name)
        return self._quorum(key, Change("cas", identity, name, value, expected_version), now)

    def _check_value(self, name: bytes, value: bytes) -> None:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError("a record's name and value are bytes")
        if len(value) > self.config.max_record_bytes:
            raise ValueError(f"a record value of {len(value)} bytes is over the limit of "
                             f"{self.config.max_record_bytes}")
        if is_service_state(name) and ServiceStateName.parse(name) is None:
            raise ValueError(f"a record name starting with {SERVICE_STATE_PREFIX.decode()} is a service's state: "
                             f"svcstate/<OWNER_HEX>/<NAME>/<key> (got {name!r})")

    def _quorum(self, key: int, change: Change, now: float) -> int:
        op = QuorumRound(self._next_id(), key, change, self.config.quorum_attempts,
                         contention_until=now + self.config.quorum_contention_s)
        self._ops[op.op_id] = op
        self._search(op, KIND_QUORUM, False, self.config.quorum_replicas, now)
        return op.op_id

    # -- API: leaving ----------------------------------------------------------------------
    def leave(self, now: float) -> int:
        """Before a graceful departure: hand every held key to its next closest nodes; emits
        :class:`HandedOff` once each copy was acknowledged or timed out (quorum groups do not move). From now on the
        node answers no search and accepts no copy, so nobody hands a key to it."""
        keys = [(info.key, KIND_CHUNK, info.replicas) for info in self.store.chunk_infos() if self.live(info, now)]
        for key in self.store.record_keys():
            stored = self.store.read_record(key)
            if stored is not None and self.trusts(stored[0].public_key):
                keys.append((key, KIND_RECORD, stored[1]))
        self.leaving = True
        op = Leave(self._next_id(), keys)
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
        if self.leaving and kind in (FindHolders, StoreChunk, StoreRecord, StorePin):
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
        elif kind in (StoreChunk, StoreRecord, StorePin) and msg.sender == self.node_id:
            self.dropped["bad_store"] += 1  # a copy "from this node" that came over the network
            self.send(src, Stored(msg.rpc_id, self.node_id, False, "the sender claims this node's id"))
        elif kind is StorePin:
            reason = self.admit_pin(msg, now)
            self.send(src, Stored(msg.rpc_id, self.node_id, reason is None, reason or ""))
        elif kind is StoreChunk or kind is StoreRecord:
            ok, reason = self._accept_chunk(msg, now) if kind is StoreChunk else self._accept_record(msg, now)
            self.send(src, Stored(msg.rpc_id, self.node_id, ok, reason))
            if ok and msg.purpose == PURPOSE_REPAIR:  # the repairer holds the key: if it goes, check at once
                self._watch(msg.key, [Contact(msg.sender, src)], now)
        elif kind is Prepare:
            if msg.ballot != ZERO_BALLOT and msg.ballot.node != msg.sender:
                self.dropped["bad_prepare"] += 1  # a ballot is its proposer's: promises are counted by it
                return
            self.send(src, self._acceptor_prepare(msg.key, msg.ballot, msg.rpc_id, msg.sender, now))
        elif kind is Accept:
            if check_record(msg.key, msg.item, self.config.max_record_bytes) is not None or \
                    check_group(msg.group) is not None:
                self.dropped["bad_accept"] += 1
                return
            state = self.store.read_acceptor(msg.key)
            if self.admit_record(msg.item, state is not None and state.item is not None) is not None:
                self.send(src, Accepted(msg.rpc_id, self.node_id, False, state.promised if state else ZERO_BALLOT))
                return
            self.send(src, self._acceptor_accept(msg.key, msg.ballot, msg.item, msg.group, msg.rpc_id, now))
        else:
            self.dropped["unexpected"] += 1

    def _accept_chunk(self, msg: StoreChunk, now: float) -> tuple[bool, str]:
        if not 1 <= msg.replicas <= MAX_REPLICAS or not 0 <= msg.purpose < len(PURPOSES):
            self.dropped["bad_store"] += 1
            return False, "bad replicas or purpose"
        if len(msg.data) > MAX_CHUNK_BYTES or chunk_key(msg.data) != msg.key:
            self.dropped["bad_chunk"] += 1
            return False, "chunk does not hash to its key"
        reason = self.admit_chunk(msg.key, msg.data, msg.replicas, msg.pin, msg.sender, now)
        if reason is not None:
            self.counters["store_refused"] += 1
            return False, reason
        self.counters[f"received_{PURPOSES[msg.purpose]}"] += 1
        return True, ""

    def _accept_record(self, msg: StoreRecord, now: float) -> tuple[bool, str]:
        if not 1 <= msg.replicas <= MAX_REPLICAS or not 0 <= msg.purpose < len(PURPOSES):
            self.dropped["bad_store"] += 1
            return False, "bad replicas or purpose"
        reason = check_record(msg.key, msg.item, self.config.max_record_bytes)
        if reason is not None:
            self.dropped["bad_record"] += 1
            return False, reason
        reason = self.admit_record(msg.item, self.store.read_record(msg.key) is not None)
        if reason is not None:
            return False, reason
        reason = self._store_locally(msg.key, KIND_RECORD, self.capped(msg.replicas), item=msg.item, now=now)
        return reason is None, reason or ""

    def _store_locally(self, key: int, kind: int, replicas: int, *, data: bytes = b"",
                       item: Item | None = None, pin: Pin | None = None, now: float = 0.0) -> str | None:
        if kind == KIND_CHUNK:
            return self.admit_chunk(key, data, replicas, pin, self.node_id, now)
        assert item is not None
        current = self.store.read_record(key)
        if current is not None and not newer(item, current[0]):
            if replicas > current[1]:
                self.store.write_record(key, current[0], replicas)  # its time stays the version's
            return None  # we hold this one or a newer one already
        return self.store.write_record(key, item, max(replicas, current[1] if current else 0), since=self.wall(now))

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
            self._on_holders(op, rpc, msg, now)
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
            self._on_search_timeout(op, rpc, now)
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

    # -- searches and requests -------------------------------------------------------------
    def _start(self, op: Op, now: float) -> None:
        """Register ``op`` and start its search (or serve it from the local store)."""
        self._ops[op.op_id] = op
        if isinstance(op, Fetch) and op.restore is None:
            data = self.store.read_chunk(op.key)
            if data is not None and op.verify(data):
                op.data = data
                self._finish(op, now)
                return
            self._drain_corrupted(now)
        if isinstance(op, Place):
            self._search(op, op.kind, False, op.replicas, now, announce=True)
        elif isinstance(op, Check):
            self._search(op, op.kind, True, op.replicas, now, announce=True)
        elif isinstance(op, GetRecord):
            self._search(op, KIND_RECORD, False, op.replicas, now)
        elif isinstance(op, Fetch):
            self._search(op, KIND_CHUNK, False, self.config.replicas, now)

    def _request(self, contact: Contact, template: Any, op: Op | None, now: float,
                 timeout_s: float | None = None) -> None:
        rpc_id = self.rng.getrandbits(63)
        while rpc_id in self._rpcs or rpc_id == 0:
            rpc_id = self.rng.getrandbits(63)
        msg = with_rpc_id(template, rpc_id)
        self._rpcs[rpc_id] = Rpc(rpc_id, contact, op.op_id if op is not None else None, type(msg))
        if op is not None:
            op.on_sent(rpc_id)
        self.send(contact.address, msg)
        if timeout_s is None:
            bulky = type(msg) in (StoreChunk, FetchChunk)
            timeout_s = self.config.transfer_timeout_s if bulky else self.config.rpc_timeout_s
        self.set_timer(("rpc", rpc_id), now + timeout_s)

    def _fresh(self, contact: Contact) -> Contact:
        """``contact`` with the address the overlay knows now (a group member may have moved)."""
        known = self.overlay.closest_known(contact.node_id, 1)
        return known[0] if known and known[0].node_id == contact.node_id else contact

    def _next_id(self) -> int:
        self._next_op += 1
        return self._next_op

    def _finish(self, op: Op, now: float) -> None:
        if op.done:
            return
        op.done = True
        self._ops.pop(op.op_id, None)
        if isinstance(op, Check) and not op.leaving:
            self._checking.discard(op.key)
        self.cancel_timer(("op", op.op_id))
        if isinstance(op, Fetch) and op.restore is not None:
            info = op.restore
            if op.data is not None:
                self.store.write_chunk(op.key, op.data, info.replicas, info.pinned, pin=info.pin, owner=info.owner,
                                       since=info.since)
                self.counters["corrupt_repaired"] += 1
        if op.parent is not None:
            parent = self._ops.get(op.parent)
            if parent is not None:
                parent.on_child(self, op, now)
            return
        if isinstance(op, PutBlob):
            chunked = op.chunked
            reason = "; ".join(op.failures)
            replicas = min(op.fewest, op.replicas)
            self.emit(BlobStored(op.op_id, chunked.blob_id, chunked.manifest.size, len(chunked.chunks),
                                 replicas, reason))
        elif isinstance(op, GetBlob):
            self.emit(BlobFetched(op.op_id, op.key, op.data, "" if op.data is not None else op.reason))
        elif isinstance(op, Place) and op.kind == KIND_RECORD:
            self.emit(RecordStored(op.op_id, op.key, op.holding, op.refusals))
        elif isinstance(op, GetRecord):
            self.emit(RecordFound(op.op_id, op.key, op.best))
        elif isinstance(op, QuorumRound):
            self.emit(QuorumFinished(op.op_id, op.key, op.ok, op.item, op.reason))
        elif isinstance(op, Leave):
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


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 1 << 160:
        raise ValueError(f"{what} must be a 160-bit int (got {key!r})")


__all__ = [
    "KINDS",
    "PURPOSE_HANDOFF",
    "Accept",
    "Accepted",
    "BlobFetched",
    "BlobStored",
    "ChunkBody",
    "ChunkBookkeeping",
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
    "Pin",
    "Prepare",
    "Promise",
    "QuorumFinished",
    "QuorumValueAccepted",
    "RecordFound",
    "RecordStored",
    "StoreChunk",
    "StorePin",
    "StoreRecord",
    "Stored",
    "sign_pin",
]
