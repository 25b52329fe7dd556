"""The Kademlia protocol of one node, sans-I/O: RPCs, lookups, storage and maintenance.

Four RPCs as in the paper (PING is ``Probe``, FIND_NODE, FIND_VALUE, STORE), each request
carrying a random ``rpc_id`` that its answer echoes. Every message heard updates the routing
table; a full bucket probes its least-recently-seen contact before a newcomer may replace it.

Multi-step work is an explicit operation object, one per query id the API returns:
- ``lookup(target)``: an iterative FIND_NODE (``LookupFinished``);
- ``get(key)``: an iterative FIND_VALUE that stops at the first valid value, or with
  ``latest=True`` asks all k closest and keeps the highest-sequence record, repairing the
  replicas that returned an older one (``GetFinished``); on success the value is cached at the
  closest node on the path that lacked it;
- ``put(key, value)`` / ``put_record(key, item)``: a lookup, then STORE to the k closest
  (``PutFinished``);
- ``bootstrap(addresses)``: probe the given addresses, look ourselves up, then refresh every
  bucket farther away than our closest neighbour (``Joined``).

Maintenance runs on timers: stale buckets are refreshed with a lookup of a random id in their
range; replicas republish items they did not hear about for ``replicate_interval_s`` (passing
on the remaining TTL, never a fresh one); original publishers republish with a fresh TTL every
``republish_interval_s``; expired items are dropped. A contact that fails a request is counted,
and replaced only after repeated failures (see ``routing.py``).

With a failure detector below it (:class:`~p2pdeploy.overlay.swim.FailureDetector`, in a
node's stack), the overlay has the detector watch the contacts in its routing table and tells it
of every peer it hears from; it consumes nothing of the detector but watches its verdicts: a
contact declared dead is stale at once (not offered, not asked; replaced when a replacement
waits), one that recovers is fresh again, and a lookup drops candidates the detector holds dead.
A dead contact then costs a lookup nothing, instead of ``eviction_failures`` timeouts.

The items held and the republish list live in the store handed in (``storage.OverlayStore``,
in memory by default): a node restarted over a durable store serves what it held and
resumes republishing what it published (due republishes wait ``rpc_timeout_s`` after start,
so a bootstrap's first answers come in before them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.overlay.admission import (
    DEFAULT_PREFIX_EXEMPT,
    NONCE_BYTES,
    AddressPrefixes,
    Challenge,
    ChallengeAnswer,
    answer,
    proves,
)
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.lookup import Lookup
from p2pdeploy.overlay.routing import ID_SPACE, Contact, RoutingTable
from p2pdeploy.overlay.storage import (
    DEFAULT_MAX_STORED_BYTES,
    DEFAULT_MAX_STORED_ITEMS,
    DEFAULT_MAX_TTL_S,
    DEFAULT_MAX_VALUE_BYTES,
    Item,
    LocalStore,
    OverlayStore,
    Publication,
    check_item,
    newness,
    supersedes,
)
from p2pdeploy.overlay.suspicion import Suspicions
from p2pdeploy.overlay.swim import OVERLAY, FailureDetector, Liveness, PeerDeclaredDead, PeerRecovered
from p2pdeploy.wire import DecodeError, NodeId, decode, encode, message

# -- messages -------------------------------------------------------------------------------


@message(10)
class Probe:
    rpc_id: int
    sender: NodeId


@message(11)
class ProbeReply:
    rpc_id: int
    sender: NodeId


@message(12)
class FindNode:
    rpc_id: int
    sender: NodeId
    target: NodeId


@message(13)
class FindValue:
    rpc_id: int
    sender: NodeId
    key: NodeId


@message(14)
class Nodes:
    rpc_id: int
    sender: NodeId
    contacts: list[Contact]


@message(15)
class Value:
    rpc_id: int
    sender: NodeId
    item: Item
    ttl_s: float
    contacts: list[Contact]


@message(16)
class Store:
    rpc_id: int
    sender: NodeId
    key: NodeId
    item: Item
    ttl_s: float
    cached: bool = False


@message(17)
class StoreReply:
    rpc_id: int
    sender: NodeId
    ok: bool
    reason: str = ""


@message(18)
class RoutingSnapshot:
    """The routing table as saved in the data directory for a fast rejoin (never sent)."""

    node_id: NodeId
    contacts: list[Contact]


REQUESTS = (Probe, FindNode, FindValue, Store, Challenge)
REPLIES = (ProbeReply, Nodes, Value, StoreReply, ChallengeAnswer)

# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupFinished:
    query_id: int
    target: int
    closest: list[Contact]
    hops: int
    requests: int
    failures: int


@dataclass(frozen=True, slots=True)
class GetFinished:
    query_id: int
    key: int
    item: Item | None
    ttl_s: float
    hops: int
    requests: int

    @property
    def found(self) -> bool:
        return self.item is not None


@dataclass(frozen=True, slots=True)
class PutFinished:
    query_id: int
    key: int
    stored: int
    refusals: list[str]


@dataclass(frozen=True, slots=True)
class Joined:
    query_id: int
    contacts: int

    @property
    def ok(self) -> bool:
        return self.contacts > 0


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KademliaConfig:
    """Tunable parameters; defaults follow the paper where it gives one."""

    k: int = 20
    alpha: int = 3
    b: int = 5
    disjoint_paths: int = 1
    rpc_timeout_s: float = 2.0
    eviction_failures: int = 3
    refresh_interval_s: float = 3600.0
    replicate_interval_s: float = 3600.0
    republish_interval_s: float = 86400.0
    default_ttl_s: float = 86400.0
    max_ttl_s: float = DEFAULT_MAX_TTL_S
    expire_check_interval_s: float = 60.0
    #: How often the failure detector's watch list is reconciled with the routing table.
    watch_sync_interval_s: float = 5.0
    cache_on_get: bool = True
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_stored_items: int = DEFAULT_MAX_STORED_ITEMS
    max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES
    #: A contact joins the routing table only after it signed a challenge sent to its address
    #: with the key its id is derived from (see ``admission.py``); needs the node's identity.
    verify_contacts: bool = True
    #: Challenges in flight at once; contacts heard beyond it wait until they are heard again.
    max_challenges: int = 64
    #: Contacts proved remembered (those outside the table too: a full bucket's newcomers).
    max_verified: int = 4096
    #: At most this many contacts of one address prefix (IPv4 /24, IPv6 /64) per bucket and
    #: per table (0: no limit); addresses in ``prefix_exempt`` count under none.
    prefix_per_bucket: int = 2
    prefix_per_table: int = 10
    prefix_exempt: tuple[str, ...] = DEFAULT_PREFIX_EXEMPT

    def __post_init__(self) -> None:
        require_at_least(self, "kademlia.", 1, "k", "alpha", "b", "disjoint_paths", "eviction_failures",
                         "max_stored_items", "max_stored_bytes", "max_challenges", "max_verified")
        require_at_least(self, "kademlia.", 0, "prefix_per_bucket", "prefix_per_table")
        require_positive(self, "kademlia.", "rpc_timeout_s", "refresh_interval_s", "replicate_interval_s",
                         "republish_interval_s", "default_ttl_s", "max_ttl_s", "expire_check_interval_s",
                         "watch_sync_interval_s")


# -- operations -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Rpc:
    contact: Contact | None  # None while probing a bootstrap address whose id is unknown
    address: Address
    query_id: int | None
    sent_at: float
    nonce: bytes = b""  # a challenge's


@dataclass(slots=True)
class _Operation:
    query_id: int
    kind: str  # lookup | get | put | join | refresh | replicate | cache
    target: int
    lookup: Lookup | None = None
    latest: bool = False
    found: list[tuple[Contact | None, Item, float]] = field(default_factory=list)  # None: our own copy
    item: Item | None = None
    ttl_s: float = 0.0
    cached: bool = False
    stores_waiting: int = 0
    stored: int = 0
    refusals: list[str] = field(default_factory=list)
    probes_waiting: int = 0
    #: A join's self-lookup: challenges of the contacts it met, still in flight (the buckets it
    #: refreshes next are those of the table they enter).
    challenges_waiting: int = 0
    looked_up: bool = False
    visible: bool = True  # emits an event when it ends (maintenance work does not)


class Kademlia(Protocol):
    handles = REQUESTS + REPLIES
    consumes = (PeerDeclaredDead, PeerRecovered)

    def __init__(self, node_id: int, rng: Rng, config: KademliaConfig | None = None,
                 store: OverlayStore | None = None, detector: FailureDetector | None = None,
                 identity: Identity | None = None) -> None:
        """``identity``: the node's key pair, to answer other nodes' challenges (``node_id`` is its id)."""
        super().__init__()
        self.node_id = node_id
        self.rng = rng
        self.config = config or KademliaConfig()
        c = self.config
        if identity is not None and identity.node_id != node_id:
            raise ValueError("the identity's node id is not this node's")
        self.identity = identity
        prefixes = AddressPrefixes(c.prefix_exempt)
        self.table = RoutingTable(node_id, c.k, c.b, eviction_failures=c.eviction_failures,
                                  prefix_of=prefixes.prefix_of, prefix_per_bucket=c.prefix_per_bucket,
                                  prefix_per_table=c.prefix_per_table)
        #: Contacts that proved their key at their address: node id -> address (bounded, oldest out).
        self._verified: dict[int, Address] = {}
        #: Challenges in flight: the challenged node id -> the challenge's rpc id.
        self._challenging: dict[int, int] = {}
        #: The items held and the republish list (``store=``: e.g. a durable one the driver opened).
        self.store: OverlayStore = store if store is not None else LocalStore(c.max_stored_items, c.max_stored_bytes)
        self._rpcs: dict[int, _Rpc] = {}
        self._ops: dict[int, _Operation] = {}
        self._probing: set[int] = set()
        #: The node's failure detector (in its stack, below this layer), or None.
        self.detector = detector
        #: The contacts the layers above avoid for a while (one list for all of them, backed by the detector).
        self.suspicions = Suspicions(detector)
        self._next_query = 0
        self._started = False
        self.counters: dict[str, int] = {"requests_sent": 0, "requests_received": 0, "timeouts": 0}

    # -- start and maintenance timers ------------------------------------------------------
    def start(self, now: float) -> None:
        """Arm the maintenance timers (the driver calls this once when the node comes up)."""
        if self._started:
            return
        self._started = True
        c = self.config
        # spread periodic work so nodes started together do not act in lock-step
        self.set_timer("refresh", now + c.refresh_interval_s * (0.5 + self.rng.random()))
        self.set_timer("replicate", now + c.replicate_interval_s * (0.5 + self.rng.random()))
        self.set_timer("expire", now + c.expire_check_interval_s)
        if self.detector is not None:
            self._sync_watch(now)
        for key, publication in self.store.publications().items():  # kept from an earlier run
            self.set_timer(("republish", key), max(publication.republish_at, now + c.rpc_timeout_s))

    # -- API -------------------------------------------------------------------------------
    def bootstrap(self, addresses: list[Address], now: float) -> int:
        """Join through nodes known only by address; emits ``Joined``."""
        self.start(now)
        op = self._new_op("join", self.node_id)
        for contact in self.table.contacts():  # a restored snapshot counts as known nodes
            self._request(contact, Probe(0, self.node_id), op, now)
            op.probes_waiting += 1
        for address in addresses:
            rpc_id = self._rpc_id()
            self._rpcs[rpc_id] = _Rpc(None, address, op.query_id, now)
            self._send_request(address, Probe(rpc_id, self.node_id), rpc_id, now)
            op.probes_waiting += 1
        if op.probes_waiting == 0:
            self._join_probed(op, now)
        return op.query_id

    def lookup(self, target: int, now: float) -> int:
        """Find the k nodes closest to ``target``; emits ``LookupFinished``."""
        op = self._new_op("lookup", target)
        self._begin_lookup(op, now)
        return op.query_id

    def get(self, key: int, now: float, *, latest: bool = False) -> int:
        """Find the value under ``key``; emits ``GetFinished`` (``item`` is None when absent)."""
        op = self._new_op("get", key)
        op.latest = latest
        local = self.store.get(key, now)
        if local is not None and not latest:
            self._finish(op, now, item=local.item, ttl_s=local.expires_at - now)
            return op.query_id
        if local is not None:
            op.found.append((None, local.item, local.expires_at - now))
        self._begin_lookup(op, now)
        return op.query_id

    def put(self, key: int, value: bytes, now: float, ttl_s: float | None = None) -> int:
        """Store an opaque value on the k nodes closest to ``key``; emits ``PutFinished``."""
        return self.put_item(key, Item(value), now, ttl_s)

    def put_item(self, key: int, item: Item, now: float, ttl_s: float | None = None) -> int:
        """Store a plain value or a signed record (see ``storage.sign_record``)."""
        ttl_s = self.config.default_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl_s <= self.config.max_ttl_s:
            raise ValueError(f"ttl_s must be in (0, {self.config.max_ttl_s}] (got {ttl_s})")
        reason = check_item(key, item, self.config.max_value_bytes)
        if reason is not None:
            raise ValueError(f"cannot put key {key:040x}: {reason}")
        self._schedule_republish(key, Publication(item, ttl_s, now + self.config.republish_interval_s))
        return self._start_store(key, item, ttl_s, now).query_id

    @property
    def published(self) -> dict[int, tuple[Item, float]]:
        """The values this node originated and republishes: key -> (item, ttl_s)."""
        return {key: (p.item, p.ttl_s) for key, p in self.store.publications().items()}

    def close(self) -> None:
        """Close the store (the driver calls this when the node stops)."""
        self.store.close()

    # -- read-only views for the layers above (they never reach into the table) -------------
    def held(self, key: int, now: float) -> Item | None:
        """The item this node itself holds under ``key`` and has not expired, or None: what
        :meth:`get` answers at once without asking anyone."""
        local = self.store.get(key, now)
        return None if local is None else local.item

    def closest_known(self, target: int, k: int | None = None) -> list[Contact]:
        """The ``k`` (default: the bucket size) live contacts closest to ``target`` we know."""
        return self.table.closest(target, k)

    def next_hop_towards(self, key: int) -> Contact | None:
        """The known contact closest to ``key`` if it is closer than this node, else ``None``
        (this node is then the root of ``key`` as far as it knows): the parent in a tree
        rooted at ``key``, as SDIMS and Scribe build them."""
        closest = self.table.closest(key, 1)
        if closest and closest[0].node_id ^ key < self.node_id ^ key:
            return closest[0]
        return None

    def is_among_closest(self, key: int, k: int | None = None) -> bool:
        """True when this node is one of the ``k`` closest to ``key`` among the nodes it knows."""
        k = self.config.k if k is None else k
        closest = self.table.closest(key, k)
        return len(closest) < k or self.node_id ^ key < closest[-1].node_id ^ key

    def buckets(self) -> list[tuple[int, int, list[Contact]]]:
        """Each k-bucket as ``(low, size, live contacts)``, in id order: the ranges an
        El-Ansary broadcast hands down, one contact per bucket."""
        limit = self.table.eviction_failures
        return [
            (bucket.low, bucket.size, [e.contact for e in bucket.entries.values() if e.failures < limit])
            for bucket in self.table.buckets
        ]

    def contact_count(self) -> int:
        return len(self.table)

    # -- what the layers above observe (their own requests and answers) -------------------
    def heard(self, contact: Contact, now: float) -> None:
        """A layer above heard from ``contact`` (its request or its answer): the routing table
        learns of it, as from an overlay message (a full bucket probes its oldest entry)."""
        self._heard(contact, now)

    def unreachable(self, node_id: int) -> None:
        """A layer above got no answer from ``node_id``: one failure, counted as for an overlay
        request (eviction still needs repeated failures and a waiting replacement)."""
        self.table.failed(node_id)

    def snapshot(self) -> bytes:
        """The routing table as CBOR bytes, for the data directory."""
        return encode(RoutingSnapshot(self.node_id, list(self.table.contacts())))

    def restore(self, data: bytes) -> int:
        """Load contacts saved by ``snapshot``; returns how many (0 for a bad or foreign file)."""
        snap = decode(data, limit_bytes=len(data))
        if isinstance(snap, DecodeError) or not isinstance(snap, RoutingSnapshot) or snap.node_id != self.node_id:
            return 0
        for contact in snap.contacts:
            self.table.add(contact)
        return len(snap.contacts)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind in REPLIES:
            self._on_reply(src, msg, now)
            return
        self.counters["requests_received"] += 1
        self._heard(Contact(msg.sender, src), now)
        if kind is Challenge:
            if self.identity is None or len(msg.nonce) != NONCE_BYTES:
                self.dropped["challenge_unanswered"] += 1
            else:
                self.send(src, answer(self.identity, msg))
        elif kind is Probe:
            self.send(src, ProbeReply(msg.rpc_id, self.node_id))
        elif kind is FindNode:
            self.send(src, Nodes(msg.rpc_id, self.node_id, self._closest_for(msg.target, msg.sender)))
        elif kind is FindValue:
            stored = self.store.get(msg.key, now)
            if stored is None:
                self.send(src, Nodes(msg.rpc_id, self.node_id, self._closest_for(msg.key, msg.sender)))
            else:
                contacts = self._closest_for(msg.key, msg.sender)
                self.send(src, Value(msg.rpc_id, self.node_id, stored.item, stored.expires_at - now, contacts))
        elif kind is Store:
            self.send(src, self._accept_store(msg, now))
        else:
            self.dropped["unexpected"] += 1

    def _closest_for(self, target: int, requester: int) -> list[Contact]:
        return [c for c in self.table.closest(target, self.config.k + 1) if c.node_id != requester][: self.config.k]

    def _accept_store(self, msg: Store, now: float) -> StoreReply:
        if not 0 < msg.ttl_s <= self.config.max_ttl_s:
            self.dropped["store_bad_ttl"] += 1
            return StoreReply(msg.rpc_id, self.node_id, False, f"ttl_s must be in (0, {self.config.max_ttl_s}]")
        reason = check_item(msg.key, msg.item, self.config.max_value_bytes)
        if reason is None:
            reason = self.store.put(msg.key, msg.item, msg.ttl_s, now, cached=msg.cached)
        if reason is not None:
            self.dropped["store_refused"] += 1
            return StoreReply(msg.rpc_id, self.node_id, False, reason)
        return StoreReply(msg.rpc_id, self.node_id, True)

    def _on_reply(self, src: Address, msg: Any, now: float) -> None:
        rpc = self._rpcs.get(msg.rpc_id)
        if rpc is None or rpc.address != src or (rpc.contact is not None and rpc.contact.node_id != msg.sender):
            self.dropped["unsolicited_reply"] += 1
            return
        del self._rpcs[msg.rpc_id]
        self.cancel_timer(("rpc", msg.rpc_id))
        contact = Contact(msg.sender, src)
        op = self._ops.get(rpc.query_id) if rpc.query_id is not None else None
        kind = type(msg)
        if kind is ChallengeAnswer:
            self._answered(contact, msg, rpc.nonce, now)
            if op is not None and op.kind == "join":
                self._join_challenge_done(op, now)
            return
        self._probing.discard(msg.sender)
        # a join waits for the challenges of the contacts it meets: a bootstrap contact counts
        # as answered once it is in the table, and buckets are refreshed once those met are in
        proving = (op is not None and op.kind == "join" and self.config.verify_contacts
                   and not self._proved(contact) and self._challenge(contact, now, op))
        if proving and op is not None and op.lookup is not None:
            op.challenges_waiting += 1
        self._heard(contact, now)
        if op is None:
            return
        if kind is ProbeReply and op.kind == "join":
            if not proving or op.lookup is not None:
                self._join_probe_done(op, now)
        elif kind is StoreReply:
            op.stores_waiting -= 1
            if msg.ok:
                op.stored += 1
            else:
                op.refusals.append(msg.reason)
            if op.stores_waiting == 0:
                self._finish(op, now)
        elif kind in (Nodes, Value) and op.lookup is not None:
            if kind is Value:
                self._on_value(op, contact, msg, now)
            op.lookup.answered(msg.sender, [c for c in msg.contacts if c.node_id != self.node_id and self._alive(c)])
            self._advance(op, now)

    def _on_value(self, op: _Operation, contact: Contact, msg: Value, now: float) -> None:
        if op.kind != "get" or check_item(op.target, msg.item, self.config.max_value_bytes) is not None:
            self.dropped["invalid_value"] += 1
            return
        if not 0 < msg.ttl_s <= self.config.max_ttl_s:
            self.dropped["invalid_value"] += 1
            return
        op.found.append((contact, msg.item, msg.ttl_s))
        if not op.latest and op.lookup is not None:
            op.lookup.finish()

    def on_timer(self, name: Hashable, now: float) -> None:
        c = self.config
        if isinstance(name, tuple):
            if name[0] == "rpc":
                self._on_rpc_timeout(name[1], now)
            elif name[0] == "republish":
                self._republish(name[1], now)
        elif name == "refresh":
            self._refresh(now)
            self.set_timer("refresh", now + c.refresh_interval_s / 4)
        elif name == "replicate":
            self._replicate(now)
            self.set_timer("replicate", now + c.replicate_interval_s)
        elif name == "expire":
            self.store.expire(now)
            self.set_timer("expire", now + c.expire_check_interval_s)
        elif name == "watch":
            self._sync_watch(now)

    # -- the failure detector's verdicts ---------------------------------------------------
    def handle_event(self, event: Any, now: float) -> bool:
        """A verdict of the detector below: a dead contact is stale at once (and replaced when
        a replacement waits), a recovered one fresh again. Not consumed: the layers above and
        the driver hear of it too."""
        if isinstance(event, PeerDeclaredDead):
            self.counters["declared_dead"] = self.counters.get("declared_dead", 0) + 1
            promoted = self.table.declare_dead(event.node_id)
            if promoted is not None:
                self._watch(promoted, now)
        elif isinstance(event, PeerRecovered):
            # alive again (it refuted, or was heard): the layers' hints that it was silent are
            # outdated, so they route through it again (a node cut off and healed, say)
            self.suspicions.clear(event.node_id)
            if self.table.get(event.node_id) is not None:
                self._heard(self.table.get(event.node_id), now)
        return False

    def _sync_watch(self, now: float) -> None:
        """Level-triggered: the overlay holds in the detector exactly the routing table's
        contacts, and the peers it holds dead until they leave the table (so lookups keep
        dropping them). Peers other layers watch are theirs to let go."""
        detector = self.detector
        assert detector is not None
        in_table = {contact.node_id: contact for contact in self.table.contacts()}
        for node_id in detector.watched(by=OVERLAY):
            if node_id not in in_table:
                detector.unwatch(node_id, by=OVERLAY)
        for contact in in_table.values():
            self._watch(contact, now)
        self.set_timer("watch", now + self.config.watch_sync_interval_s)

    def _watch(self, contact: Contact, now: float) -> None:
        detector = self.detector
        if detector is None or OVERLAY in detector.holders(contact.node_id):
            return
        if (detector.state(contact.node_id) is Liveness.unknown
                and detector.watch_count() >= detector.config.max_watched):
            self.dropped["watch_list_full"] += 1
            return
        detector.watch(contact.node_id, contact.address, now, by=OVERLAY)  # or join another layer's watch

    def _alive(self, contact: Contact) -> bool:
        return self.detector is None or not self.detector.dead(contact.node_id)

    def _on_rpc_timeout(self, rpc_id: int, now: float) -> None:
        rpc = self._rpcs.pop(rpc_id, None)
        if rpc is None:
            return
        self.counters["timeouts"] += 1
        if rpc.nonce:
            self._challenging.pop(rpc.contact.node_id if rpc.contact is not None else -1, None)
            self.dropped["challenge_timeout"] += 1
            op = self._ops.get(rpc.query_id) if rpc.query_id is not None else None
            if op is not None and op.kind == "join":
                self._join_challenge_done(op, now)
            return
        if rpc.contact is not None:
            node_id = rpc.contact.node_id
            self.table.failed(node_id)
            if node_id in self._probing:
                self._probing.discard(node_id)
                if self.table.get(node_id) is not None and not self.table.is_stale(node_id):
                    self._probe_lrs(rpc.contact, now)  # one slow answer is not a failure yet
        op = self._ops.get(rpc.query_id) if rpc.query_id is not None else None
        if op is None:
            return
        if op.kind == "join" and op.probes_waiting > 0 and op.lookup is None:
            op.probes_waiting -= 1
            if op.probes_waiting == 0:
                self._join_probed(op, now)
        elif op.stores_waiting > 0 and op.lookup is None:
            op.stores_waiting -= 1
            op.refusals.append("timeout")
            if op.stores_waiting == 0:
                self._finish(op, now)
        elif op.lookup is not None and rpc.contact is not None:
            op.lookup.failed(rpc.contact.node_id)
            self._advance(op, now)

    # -- routing-table upkeep --------------------------------------------------------------
    def _heard(self, contact: Contact, now: float) -> None:
        if self.config.verify_contacts and not self._proved(contact):
            self._challenge(contact, now)
            return
        if self.detector is not None:
            self.detector.heard(contact.node_id, contact.address, now)  # evidence of life
        result = self.table.add(contact)
        if result.outcome == "crowded":
            self.dropped["prefix_crowded"] += 1
        elif result.outcome == "added":
            self._watch(contact, now)
        if result.probe is not None and result.probe.node_id not in self._probing:
            self._probe_lrs(result.probe, now)
        elif result.outcome == "added" and len(self.store):
            self._hand_off(contact, now)

    # -- admission (see admission.py) ------------------------------------------------------
    def _proved(self, contact: Contact) -> bool:
        known = self.table.get(contact.node_id)
        if known is not None and known.address == contact.address:
            return True
        return self._verified.get(contact.node_id) == contact.address

    def _challenge(self, contact: Contact, now: float, op: _Operation | None = None) -> bool:
        """Challenge ``contact`` unless too many challenges are in flight; True when one of it is
        in flight now, whose answer or timeout is ``op``'s (if given, and the challenge had none)."""
        if contact.node_id == self.node_id:
            return False
        in_flight = self._challenging.get(contact.node_id)
        if in_flight is not None:
            rpc = self._rpcs[in_flight]
            if op is None or rpc.query_id is not None:
                return False
            rpc.query_id = op.query_id
            return True
        if len(self._challenging) >= self.config.max_challenges:
            self.dropped["challenge_busy"] += 1
            return False
        self.counters["challenges_sent"] = self.counters.get("challenges_sent", 0) + 1
        nonce = self.rng.getrandbits(8 * NONCE_BYTES).to_bytes(NONCE_BYTES, "big")
        rpc_id = self._rpc_id()
        self._challenging[contact.node_id] = rpc_id
        self._rpcs[rpc_id] = _Rpc(contact, contact.address, op.query_id if op else None, now, nonce)
        self._send_request(contact.address, Challenge(rpc_id, self.node_id, nonce), rpc_id, now)
        return True

    def _answered(self, contact: Contact, msg: ChallengeAnswer, nonce: bytes, now: float) -> None:
        self._challenging.pop(contact.node_id, None)
        if not proves(msg, contact.node_id, nonce, self.node_id):
            self.dropped["challenge_failed"] += 1
            return
        verified = self._verified
        verified.pop(contact.node_id, None)
        verified[contact.node_id] = contact.address
        while len(verified) > self.config.max_verified:
            del verified[next(iter(verified))]
        self._heard(contact, now)

    def _hand_off(self, newcomer: Contact, now: float) -> None:
        """A node we did not know may be one of the k closest to keys we hold: give it those.

        Only the holder closest to a key among the nodes it knows sends, so a join does not
        draw k copies of every value (the paper's section 2.5)."""
        k = self.config.k
        for key, stored in self.store.items():
            if stored.cached:
                continue
            closest = self.table.closest(key, k)
            if newcomer not in closest:
                continue
            own = self.node_id ^ key
            if any(c.node_id ^ key < own for c in closest if c.node_id != newcomer.node_id):
                continue
            remaining = stored.expires_at - now
            if remaining > 0:
                self._request(newcomer, Store(0, self.node_id, key, stored.item, remaining), None, now)

    def _probe_lrs(self, contact: Contact, now: float) -> None:
        self._probing.add(contact.node_id)
        self._request(contact, Probe(0, self.node_id), None, now)

    # -- sending ---------------------------------------------------------------------------
    def _rpc_id(self) -> int:
        rpc_id = self.rng.getrandbits(63)
        while rpc_id in self._rpcs or rpc_id == 0:
            rpc_id = self.rng.getrandbits(63)
        return rpc_id

    def _request(self, contact: Contact, template: Any, op: _Operation | None, now: float) -> None:
        """Send a request to ``contact`` (``template`` with a fresh rpc id) and arm its timeout."""
        rpc_id = self._rpc_id()
        msg = dataclasses.replace(template, rpc_id=rpc_id)
        self._rpcs[rpc_id] = _Rpc(contact, contact.address, op.query_id if op else None, now)
        self._send_request(contact.address, msg, rpc_id, now)

    def _send_request(self, address: Address, msg: Any, rpc_id: int, now: float) -> None:
        self.counters["requests_sent"] += 1
        self.send(address, msg)
        self.set_timer(("rpc", rpc_id), now + self.config.rpc_timeout_s)

    # -- operations ------------------------------------------------------------------------
    def _new_op(self, kind: str, target: int, *, visible: bool = True) -> _Operation:
        self._next_query += 1
        op = _Operation(self._next_query, kind, target, visible=visible)
        self._ops[op.query_id] = op
        return op

    def _begin_lookup(self, op: _Operation, now: float) -> None:
        c = self.config
        self.table.touch(op.target, now)
        seeds = self.table.closest(op.target, c.k * c.disjoint_paths)
        op.lookup = Lookup(op.target, seeds, k=c.k, alpha=c.alpha, own_id=self.node_id, paths=c.disjoint_paths)
        self._advance(op, now)

    def _advance(self, op: _Operation, now: float) -> None:
        lookup = op.lookup
        assert lookup is not None
        request = FindValue(0, self.node_id, op.target) if op.kind == "get" else FindNode(0, self.node_id, op.target)
        for contact in lookup.next_requests():
            self._request(contact, request, op, now)
        if lookup.done and not lookup.waiting():
            self._lookup_done(op, now)
        elif lookup.done and op.kind == "get" and op.found and not op.latest:
            self._lookup_done(op, now)  # a value is in hand: answers still in flight do not matter

    def _lookup_done(self, op: _Operation, now: float) -> None:
        lookup = op.lookup
        assert lookup is not None
        if op.kind == "get":
            self._get_done(op, now)
        elif op.kind in ("put", "replicate"):
            targets = lookup.result()
            op.lookup = None
            assert op.item is not None
            if self._closer_than_all(op.target, targets):  # we are a replica ourselves
                reason = self.store.put(op.target, op.item, op.ttl_s, now)
                if reason is None:
                    op.stored += 1
                else:
                    op.refusals.append(reason)
            if not targets:
                self._finish(op, now)
                return
            for contact in targets:
                self._request(contact, Store(0, self.node_id, op.target, op.item, op.ttl_s), op, now)
            op.stores_waiting = len(targets)
        elif op.kind == "join":
            op.looked_up = True
            if op.challenges_waiting == 0:
                self._join_looked_up(op, now)
        else:
            self._finish(op, now)

    def _closer_than_all(self, key: int, contacts: list[Contact]) -> bool:
        """True when this node is itself among the k closest to ``key`` it knows."""
        if len(contacts) < self.config.k:
            return True
        return (self.node_id ^ key) < (contacts[-1].node_id ^ key)

    def _get_done(self, op: _Operation, now: float) -> None:
        lookup = op.lookup
        assert lookup is not None
        if not op.found:
            self._finish(op, now)
            return
        # the newest record; among equal ones, the copy that lives longest
        _, best, ttl_s = max(op.found, key=lambda f: (*newness(f[1]), f[2]))
        if op.latest:  # read repair: replicas that answered with an older record get the newest
            for contact, item, _ in op.found:
                if contact is not None and item != best and supersedes(best, item) is None:
                    self._request(contact, Store(0, self.node_id, op.target, best, ttl_s), None, now)
        elif self.config.cache_on_get:
            holders = {contact.node_id for contact, _, _ in op.found if contact is not None}
            for candidate in lookup.closest_answered():
                if candidate.contact.node_id not in holders:
                    cache_ttl = min(ttl_s, self.config.replicate_interval_s)
                    self._request(candidate.contact, Store(0, self.node_id, op.target, best, cache_ttl, True), None, now)
                    break
        self._finish(op, now, item=best, ttl_s=ttl_s)

    def _join_challenge_done(self, op: _Operation, now: float) -> None:
        if op.lookup is None:
            self._join_probe_done(op, now)
            return
        op.challenges_waiting -= 1
        if op.challenges_waiting == 0 and op.looked_up:
            self._join_looked_up(op, now)

    def _join_probe_done(self, op: _Operation, now: float) -> None:
        if op.probes_waiting > 0 and op.lookup is None:
            op.probes_waiting -= 1
            if op.probes_waiting == 0:
                self._join_probed(op, now)

    def _join_probed(self, op: _Operation, now: float) -> None:
        """Bootstrap contacts answered (or not): look ourselves up."""
        self.table.touch(self.node_id, now)
        op.lookup = Lookup(self.node_id, self.table.closest(self.node_id), k=self.config.k,
                           alpha=self.config.alpha, own_id=self.node_id)
        self._advance(op, now)

    def _join_looked_up(self, op: _Operation, now: float) -> None:
        """After the self-lookup, refresh every bucket farther than our closest neighbour."""
        closest = self.table.closest(self.node_id, 1)
        if closest:
            nearest_bucket = self.table.bucket_for(closest[0].node_id)
            for bucket in list(self.table.buckets):
                if bucket is not nearest_bucket and not bucket.covers(self.node_id):
                    self._refresh_bucket(bucket, now)
        self._finish(op, now)

    def _refresh(self, now: float) -> None:
        for bucket in self.table.stale_buckets(now, self.config.refresh_interval_s):
            self._refresh_bucket(bucket, now)

    def _refresh_bucket(self, bucket: Any, now: float) -> None:
        target = bucket.low + self.rng.randrange(bucket.size)
        op = self._new_op("refresh", target, visible=False)
        self._begin_lookup(op, now)

    def _start_store(self, key: int, item: Item, ttl_s: float, now: float, *, visible: bool = True) -> _Operation:
        op = self._new_op("put" if visible else "replicate", key, visible=visible)
        op.item, op.ttl_s = item, ttl_s
        self._begin_lookup(op, now)
        return op

    def _replicate(self, now: float) -> None:
        """Replica republish: items not refreshed by anyone for an interval go out again."""
        horizon = now - self.config.replicate_interval_s
        for key, stored in self.store.items():
            if stored.cached or stored.refreshed_at > horizon:
                continue
            remaining = stored.expires_at - now
            if remaining > 0:
                self.store.refreshed(key, now)
                self._start_store(key, stored.item, remaining, now, visible=False)

    def _republish(self, key: int, now: float) -> None:
        publication = self.store.publications().get(key)
        if publication is None:
            return
        self._start_store(key, publication.item, publication.ttl_s, now, visible=False)
        self._schedule_republish(key, dataclasses.replace(publication, republish_at=now + self.config.republish_interval_s))

    def _schedule_republish(self, key: int, publication: Publication) -> None:
        self.store.publish(key, publication)
        self.set_timer(("republish", key), publication.republish_at)

    def unpublish(self, key: int) -> None:
        """Stop republishing ``key``; its replicas expire with their TTL."""
        self.store.unpublish(key)
        self.cancel_timer(("republish", key))

    def _finish(self, op: _Operation, now: float, *, item: Item | None = None, ttl_s: float = 0.0) -> None:
        self._ops.pop(op.query_id, None)
        if not op.visible:
            return
        lookup = op.lookup
        hops = lookup.hops() if lookup else 0
        requests = lookup.requests_sent if lookup else 0
        if op.kind == "lookup":
            assert lookup is not None
            self.emit(LookupFinished(op.query_id, op.target, lookup.result(), hops, requests, lookup.failures))
        elif op.kind == "get":
            self.emit(GetFinished(op.query_id, op.target, item, ttl_s, hops, requests))
        elif op.kind == "put":
            self.emit(PutFinished(op.query_id, op.target, op.stored, op.refusals))
        elif op.kind == "join":
            self.emit(Joined(op.query_id, len(self.table)))


__all__ = [
    "ID_SPACE",
    "Contact",
    "FindNode",
    "FindValue",
    "GetFinished",
    "Joined",
    "Kademlia",
    "KademliaConfig",
    "LookupFinished",
    "Nodes",
    "Probe",
    "ProbeReply",
    "PutFinished",
    "RoutingSnapshot",
    "Store",
    "StoreReply",
    "Value",
]
