"""The resource prospector: an aggregation tree over the overlay, and queries that descend it.

**The tree** (SDIMS and Willow). The tree named ``config.tree`` is rooted at the node closest
to ``key_id(tree)``; a node's parent is its next hop towards that key as Kademlia sees it
(``closest_known``, skipping contacts this layer suspects), so the parent is always closer to
the key than the child (no cycles) and the depth is O(log N). One tree carries every attribute,
as in Willow: one update per node and interval whatever the number of attributes, and a query
over several attributes can prune with all of them at once.

Every node pushes to its parent its own attributes and the :class:`Summary` of its subtree
(its attributes merged with its children's: COUNT, SUM, MIN, MAX, value counts, TOP-K, see
:mod:`p2pdeploy.collective.aggregation`): at once when something changed, but at most one
update per ``min_update_interval_s`` (the rate bound), and at least every ``update_interval_s``
as a heartbeat. State is soft:

- a parent keeps one entry per child id, replaced by each update (never added to), so a child
  is counted once; an entry not refreshed for ``expiry_s`` is dropped, so a dead subtree
  disappears and its live members reappear under their new parents;
- a parent acks each update; a parent that does not ack ``update_tries`` sends is suspected for
  ``suspect_s`` and the child re-parents at once to its next hop (churn repair);
- the dead parent's entry at the grandparent still counts the orphan's subtree, which its new
  parent now counts too: the orphan tells the grandparent (``Orphaned``, with the summary the
  dead parent last acked), which subtracts it from that entry until it expires. Without this a
  dead inner node near the root double-counts its whole subtree for up to ``expiry_s``;
- a child that changes parent (its next hop changed) keeps the old one until the new one acks,
  then sends the old one a ``Detach``, so the static case stays exact;
- a node that finds itself the root (no known live node is closer to the key) checks it with
  one overlay lookup of the key, which fills its routing table with the closest live nodes.

Acks carry the root's contact, the parent's depth and the parent's own parent down the tree: any
node can reach the root in one hop when its cache is fresh, and parent by parent otherwise.

**Queries.** ``aggregate(attribute, fn)`` travels to the root and is answered from the root's
summary (count, sum, min, max, avg, top, values), emitting ``AggregateFinished``.
``prospect(requirement, n)`` finds up to n nodes that satisfy a requirement of the requirements
language (the one service manifests use) and emits ``ProspectFinished``. It is a best-first
descent guided by the summaries (Cone): a visited node answers with whether it matches itself,
those of its children whose own attributes match (exactly, from their last update) chosen for
spread across owners and regions, and the children whose subtree summaries *may* hold a match,
ranked by an upper bound on their matches (:func:`~p2pdeploy.collective.aggregation.match_bound`;
those bounded by 0 are pruned). The querier visits
its own subtree for free, then the root, then candidates (each visit verifies a candidate alive
and fresh, and explores its subtree) and promising subtrees, at most ``alpha`` at a time and no
more than it still needs. With matches common it costs the root's visit plus one per node
returned; with rare matches a few descents of O(log N) each.

Not here: what the attributes are (the resource layer describes nodes, see
:func:`p2pdeploy.resource.description.node_attributes`), and placement decisions.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from p2pdeploy.collective.aggregation import (
    Limits,
    Summary,
    TopEntry,
    WireValue,
    attributes_from_wire,
    attributes_to_wire,
    match_bound,
    merge,
    normalize_attributes,
    subtract,
    summarise,
    summary_problem,
)
from p2pdeploy.core import Address, Protocol, Rng
from p2pdeploy.overlay.identity import key_id
from p2pdeploy.overlay.kademlia import Kademlia, LookupFinished
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.overlay.routing import Contact, next_hop_towards
from p2pdeploy.resource.description import DescriptionChanged
from p2pdeploy.resource.requirements import MAX_SOURCE_CHARS, ParseError, Requirement
from p2pdeploy.wire import NodeId, message, record

#: What ``aggregate`` can compute at the root.
FUNCTIONS = ("count", "sum", "min", "max", "avg", "top", "values")
#: A request routed to the root gives up after this many forwards (stale caches cannot loop it).
MAX_HOPS = 32
#: Node ids a querier lists as already known, so visited nodes do not offer them again.
MAX_EXCLUDE = 64
MAX_REPLY_CANDIDATES = 32
#: Suspicions past their time are forgotten lazily; this many trigger a sweep.
MAX_SUSPECTS = 256
#: Query requests (visits, requests to the root) waiting for answers at once. At the cap a query
#: makes no further visit until an answer frees a slot; one with nothing in flight finishes with
#: what it has (not exhausted, as when out of budget), and an aggregate that cannot ask fails.
MAX_RPCS = 4096
_PARSED_CACHE = 128

T = TypeVar("T")

# -- messages (wire tags 80-99) -------------------------------------------------------------


@record
@dataclass(frozen=True, slots=True)
class Candidate:
    """A node offered by its parent: its contact and its attributes from its last update."""

    contact: Contact
    attributes: dict[str, WireValue]


@record
@dataclass(frozen=True, slots=True)
class Subtree:
    """A child whose subtree may hold a match: at most ``bound`` of its ``nodes`` nodes do."""

    contact: Contact
    nodes: int
    bound: int


@message(80)
@dataclass(frozen=True, slots=True)
class AggregateUpdate:
    """Child to parent: the child's own attributes and its subtree's summary."""

    sender: NodeId
    tree: NodeId
    epoch: int
    seq: int
    attributes: dict[str, WireValue]
    #: None for a leaf: its subtree is its own attributes, which the parent summarises itself.
    summary: Summary | None


@message(81)
@dataclass(frozen=True, slots=True)
class AggregateAck:
    """Parent to child: update ``seq`` arrived; the parent's depth (-1: unknown), root and parent."""

    sender: NodeId
    tree: NodeId
    seq: int
    depth: int
    root: Contact | None
    parent: Contact | None


@message(82)
@dataclass(frozen=True, slots=True)
class Detach:
    """Child to its former parent: drop my entry (I am counted elsewhere now)."""

    sender: NodeId
    tree: NodeId
    epoch: int
    seq: int


@message(83)
@dataclass(frozen=True, slots=True)
class ProspectRequest:
    """Visit a node for a prospect; with ``to_root`` each node forwards it to its parent first."""

    rpc_id: int
    requester: Contact
    tree: NodeId
    requirement: str
    wanted: int
    exclude: list[NodeId]
    to_root: bool
    hops: int
    #: A second look at a node with more promising subtrees than one answer holds: skip this
    #: many of them (and offer no candidates again).
    offset: int = 0


@message(84)
@dataclass(frozen=True, slots=True)
class ProspectReply:
    rpc_id: int
    sender: NodeId
    hops: int
    is_root: bool
    matches: bool
    #: The sender's own attributes when it matches (empty otherwise).
    attributes: dict[str, WireValue]
    candidates: list[Candidate]
    subtrees: list[Subtree]
    #: Promising subtrees beyond these (ask again with ``offset``).
    more: int = 0


@message(85)
@dataclass(frozen=True, slots=True)
class AggregateRequest:
    """A global question for the root (``attribute`` "" is the node count)."""

    rpc_id: int
    requester: Contact
    tree: NodeId
    attribute: str
    fn: str
    hops: int


@message(86)
@dataclass(frozen=True, slots=True)
class AggregateReply:
    rpc_id: int
    sender: NodeId
    hops: int
    nodes: int
    number: int | float | None
    values: dict[str, int]
    top: list[TopEntry]


@message(87)
@dataclass(frozen=True, slots=True)
class Orphaned:
    """Child to its grandparent: my parent ``lost`` stopped answering. Its entry there still
    counts my subtree (``summary``, as the parent last acked it), which my new parent counts now."""

    sender: NodeId
    tree: NodeId
    lost: NodeId
    summary: Summary


MESSAGES = (
    AggregateUpdate, AggregateAck, Detach, Orphaned, ProspectRequest, ProspectReply, AggregateRequest, AggregateReply,
)  # fmt: skip

# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundNode:
    """A node a prospect found: how to reach it and its attributes (sets as frozensets)."""

    contact: Contact
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProspectFinished:
    query_id: int
    requirement: str
    n: int
    #: Up to n matching nodes, chosen for spread across ``config.spread`` (owners, regions).
    nodes: list[FoundNode]
    #: Matching nodes found in all (verified ones when ``verify_candidates``).
    matches_seen: int
    visits: int
    #: Messages the query caused: requests, forwards on the way to the root, and replies.
    messages: int
    #: Every subtree that may hold a match was explored: fewer than n nodes means fewer exist
    #: (as far as the summaries and the nodes that answered know).
    exhausted: bool
    timeouts: int


@dataclass(frozen=True, slots=True)
class AggregateFinished:
    query_id: int
    attribute: str | None
    fn: str
    #: A number (count, sum, min, max, avg; None when no node has the attribute), a list of
    #: :class:`TopEntry` (top), or value -> node count (values).
    value: Any
    #: Nodes in the tree, as the root counts them.
    nodes: int
    root: int | None
    messages: int
    ok: bool


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProspectorConfig:
    """Tunable parameters of the prospector; every node of a community should agree on ``tree``."""

    tree: str = "p2pdeploy/resources"
    update_interval_s: float = 10.0
    min_update_interval_s: float = 1.0
    expiry_s: float = 25.0
    ack_timeout_s: float = 2.0
    update_tries: int = 2
    suspect_s: float = 300.0
    parent_choices: int = 8
    max_children: int = 4096
    rpc_timeout_s: float = 2.0
    root_timeout_s: float = 5.0
    alpha: int = 3
    candidate_factor: int = 2
    max_subtrees: int = 32
    max_visits: int = 64
    verify_candidates: bool = True
    spread: tuple[str, ...] = ("owner", "region")
    max_distinct: int = 16
    max_attributes: int = 64
    top_k: int = 3
    top_attributes: tuple[str, ...] = ("memory_free", "cpu_free", "disk_free")

    def __post_init__(self) -> None:
        if not self.tree:
            raise ValueError("prospector.tree must name the tree (got an empty string)")
        for name in ("update_interval_s", "min_update_interval_s", "ack_timeout_s", "suspect_s", "rpc_timeout_s",
                     "root_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"prospector.{name} must be > 0 (got {getattr(self, name)})")
        if self.min_update_interval_s > self.update_interval_s:
            raise ValueError(
                f"prospector.min_update_interval_s must be <= update_interval_s "
                f"(got {self.min_update_interval_s} > {self.update_interval_s})"
            )
        if not self.expiry_s > self.update_interval_s:
            raise ValueError(
                f"prospector.expiry_s must be > update_interval_s, or live children expire "
                f"(got {self.expiry_s} <= {self.update_interval_s})"
            )
        for name in ("update_tries", "parent_choices", "max_children", "alpha", "candidate_factor", "max_subtrees",
                     "max_visits", "max_distinct", "max_attributes"):
            if getattr(self, name) < 1:
                raise ValueError(f"prospector.{name} must be >= 1 (got {getattr(self, name)})")
        if self.top_k < 0:
            raise ValueError(f"prospector.top_k must be >= 0 (got {self.top_k})")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_distinct, self.max_attributes, self.top_k, frozenset(self.top_attributes))

    @property
    def key(self) -> int:
        """The tree's key: its root is the live node closest to it."""
        return key_id(self.tree.encode())


# -- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Child:
    contact: Contact
    epoch: int
    seq: int
    wire_attributes: dict[str, WireValue]
    attributes: dict[str, Any]
    summary: Summary
    expires_at: float
    #: Subtrees of this (dead) child's former children, now counted elsewhere: not counted here.
    orphans: dict[int, Summary] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    """An update waiting for its ack, and the summary it carries (its own for a leaf)."""

    contact: Contact
    msg: AggregateUpdate
    summary: Summary
    tries: int


@dataclass(slots=True)
class _Rpc:
    query_id: int
    #: Who must answer; ``None`` for a request routed to the root (any root may answer).
    expected: Contact | None
    target: Contact
    kind: str  # root | candidate | subtree | aggregate
    offset: int = 0


@dataclass(slots=True)
class _ProspectOp:
    query_id: int
    requirement: Requirement
    n: int
    found: dict[int, FoundNode] = field(default_factory=dict)
    candidates: dict[int, FoundNode] = field(default_factory=dict)
    #: Heap of (-bound, -nodes, id, offset, contact): subtrees to visit, best first; offset > 0 is a
    #: second look at a node whose promising children did not fit in one answer.
    subtrees: list[tuple[int, int, int, int, Contact]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    inflight: dict[int, FoundNode | None] = field(default_factory=dict)  # rpc id -> candidate visited
    visits: int = 0
    messages: int = 0
    root_targets: list[int] = field(default_factory=list)
    #: The request on its way to the root: the root's answer sees the whole tree, so the
    #: querier waits for it before choosing whom to visit (better spread, no wasted visit).
    root_rpc: int | None = None
    timeouts: int = 0
    budget_hit: bool = False


@dataclass(slots=True)
class _AggregateOp:
    query_id: int
    attribute: str | None
    fn: str
    messages: int = 0
    tries: int = 0


class Prospector(Protocol):
    """One node's part of the aggregation tree and of the prospect and aggregate queries."""

    handles = MESSAGES
    consumes = (LookupFinished, DescriptionChanged)

    def __init__(
        self,
        overlay: Kademlia,
        address: Address,
        rng: Rng,
        config: ProspectorConfig | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """``attributes`` are published as given (``set_attributes`` replaces them). In a node's
        stack the :class:`~p2pdeploy.resource.description.NodeDescription` layer below keeps
        them current: this layer consumes its ``DescriptionChanged`` events, so what changes
        locally (free memory as replicas start and stop) reaches the tree at the next update."""
        super().__init__()
        self.overlay = overlay
        self.node_id = overlay.node_id
        self.contact = Contact(overlay.node_id, address)
        self.rng = rng
        self.config = config or ProspectorConfig()
        self.key = self.config.key
        self.limits = self.config.limits
        #: This incarnation: a restarted node's updates replace its old entry whatever their seq.
        self.epoch = rng.getrandbits(62)
        self.seq = 0
        self.attributes: dict[str, Any] = {}
        self._wire_attributes: dict[str, WireValue] = {}
        self._own_summary = summarise({}, self.contact, self.limits)
        #: The acked parent (None: root, or not attached yet).
        self.parent: Contact | None = None
        #: Hops from the root (0 at the root; None while unknown).
        self.depth: int | None = None
        #: The root's contact as the acks last told it.
        self.root: Contact | None = None
        #: The parent's parent, told by its acks: where to report the parent's death.
        self.grandparent: Contact | None = None
        #: The subtree summary the parent acked last (what its entry for us counts).
        self._acked_summary: Summary | None = None
        self._lookup_at = float("-inf")
        #: Query ids of this layer's own overlay lookups, whose ``LookupFinished`` it consumes.
        self._root_lookups: set[int] = set()
        self.children: dict[int, _Child] = {}
        self.suspects: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        self._summary: Summary | None = None
        self._dirty = True
        self._last_push_at = float("-inf")
        self._last_sent: tuple[int, Summary, dict[str, WireValue]] | None = None
        self._started = False
        #: Query requests waiting for their answer (from ``_Rpc.expected``, or any root).
        self._rpcs: RequestTracker[_Rpc] = RequestTracker(self, "rpc", rng=rng, id_bits=62, limit=MAX_RPCS)
        self._ops: dict[int, _ProspectOp | _AggregateOp] = {}
        self._next_query = 0
        self._parsed: dict[str, Requirement] = {}
        self.counters: Counter[str] = Counter()
        if attributes:
            self._set(attributes)

    # -- lifetime and attributes -----------------------------------------------------------
    def start(self, now: float) -> None:
        """Arm the first update (the driver calls this once when the node comes up)."""
        if self._started:
            return
        self._started = True
        # spread the first updates of nodes started together over the rate-bound interval
        self.set_timer("push", now + self.rng.uniform(0, self.config.min_update_interval_s))

    def set_attributes(self, attributes: Mapping[str, Any], now: float) -> None:
        """Publish this node's attributes (replacing the previous ones); raises ``ValueError``
        naming an attribute that cannot be published."""
        if self._set(attributes):
            self._changed(now)

    def _set(self, attributes: Mapping[str, Any]) -> bool:
        normalized = normalize_attributes(attributes)
        if normalized == self.attributes:
            return False
        self.attributes = normalized
        self._wire_attributes = attributes_to_wire(normalized)
        self._own_summary = summarise(normalized, self.contact, self.limits)
        return True

    # -- read-only views -------------------------------------------------------------------
    def summary(self) -> Summary:
        """This node's subtree: its own attributes merged with its live children's."""
        if self._summary is None:
            parts = [self._own_summary]
            for child in self.children.values():
                if child.orphans:  # a dead child's entry, minus the subtrees counted elsewhere now
                    parts.append(subtract(child.summary, child.orphans.values()))
                else:
                    parts.append(child.summary)
            self._summary = merge(parts, self.limits)
        return self._summary

    @property
    def is_root(self) -> bool:
        """This node believes it is the root (it knows no live node closer to the tree's key)."""
        return self.depth == 0

    def preferred_parent(self, now: float) -> Contact | None:
        """The next hop towards the tree's key, skipping suspected contacts; None at the root."""
        suspects = self.suspects

        def suspected(node_id: int) -> bool:
            until = suspects.get(node_id)
            if until is None:
                return False
            if until > now:
                return True
            del suspects[node_id]  # the suspicion ran out
            return False

        return next_hop_towards(self.node_id, self.key, self.overlay.closest_known(self.key, self.config.parent_choices),
                                suspected)

    # -- API -------------------------------------------------------------------------------
    def prospect(self, requirement: str | Requirement, n: int, now: float) -> int:
        """Find up to ``n`` nodes that satisfy ``requirement``; emits ``ProspectFinished``.

        Raises :class:`~p2pdeploy.resource.requirements.ParseError` for a malformed requirement
        and ``ValueError`` for ``n < 1``."""
        parsed = requirement if isinstance(requirement, Requirement) else Requirement.parse(requirement)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prospect needs n >= 1 nodes (got {n!r})")
        text = str(parsed)
        if len(text) > MAX_SOURCE_CHARS:
            raise ValueError(f"requirement is longer than {MAX_SOURCE_CHARS} characters")
        op = _ProspectOp(self._new_query(), parsed, n)
        op.seen.add(self.node_id)
        self._ops[op.query_id] = op
        # our own subtree is known locally: no message, and no page limit
        self._absorb(op, self.contact, self._visit(parsed, n, set(), 0, 0, now, page=len(self.children)), now)
        if self.preferred_parent(now) is not None:
            self._send_to_root(op, now)
        self._advance_prospect(op, now)
        return op.query_id

    def aggregate(self, attribute: str | None, fn: str, now: float) -> int:
        """Ask the root for ``fn`` of ``attribute`` over the tree; emits ``AggregateFinished``.

        ``fn`` is one of ``FUNCTIONS``; ``aggregate(None, "count")`` counts the nodes."""
        if fn not in FUNCTIONS:
            raise ValueError(f"aggregate fn must be one of {', '.join(FUNCTIONS)} (got {fn!r})")
        if attribute is None and fn != "count":
            raise ValueError(f"aggregate {fn!r} needs an attribute name (only count works on the nodes)")
        if attribute is not None and (not isinstance(attribute, str) or not attribute):
            raise ValueError(f"an attribute is a non-empty name (got {attribute!r})")
        op = _AggregateOp(self._new_query(), attribute, fn)
        if self.preferred_parent(now) is None:
            reply = self._answer(0, attribute or "", fn, 0)
            self._finish_aggregate(op, reply, self.node_id, ok=True)
            return op.query_id
        self._ops[op.query_id] = op
        if not self._send_aggregate(op, now):
            self._aggregate_failed(op)
        return op.query_id

    # -- inputs ----------------------------------------------------------------------------
    def handle_event(self, event: Any, now: float) -> bool:
        """This node's new description, to publish; or the end of a root lookup this layer
        started, which only filled the routing table (the next update finds its parent there)."""
        if isinstance(event, DescriptionChanged):
            try:
                self.set_attributes(event.attributes, now)
            except (TypeError, ValueError):  # local code, but an event must not crash the node
                self.counters["bad_description"] += 1
            return True
        if isinstance(event, LookupFinished) and event.query_id in self._root_lookups:
            self._root_lookups.discard(event.query_id)
            return True
        return False

    def receive(self, src: Address, msg: Any, now: float) -> None:
        if getattr(msg, "tree", self.key) != self.key:
            self.dropped["foreign_tree"] += 1
            return
        kind = type(msg)
        if kind is AggregateUpdate:
            self._on_update(src, msg, now)
        elif kind is AggregateAck:
            self._on_ack(src, msg, now)
        elif kind is Detach:
            self._on_detach(msg, now)
        elif kind is Orphaned:
            self._on_orphaned(msg, now)
        elif kind is ProspectRequest:
            self._on_prospect_request(msg, now)
        elif kind is ProspectReply:
            self._on_prospect_reply(src, msg, now)
        elif kind is AggregateRequest:
            self._on_aggregate_request(msg, now)
        elif kind is AggregateReply:
            self._on_aggregate_reply(src, msg, now)
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "push":
            self._push(now)
        elif name == "expire":
            self._expire(now)
        elif isinstance(name, tuple) and name[0] == "ack":
            self._on_ack_timeout(name[1], now)
        elif self._rpcs.owns(name):
            self._on_rpc_timeout(name, now)

    # -- the tree: updates, acks, detaches, expiry -----------------------------------------
    def _changed(self, now: float) -> None:
        self._summary = None
        self._dirty = True
        if not self._started:
            return
        due = max(now, self._last_push_at + self.config.min_update_interval_s)
        current = self.timer_deadline("push")
        if current is None or due < current:
            self.set_timer("push", due)

    def _push(self, now: float) -> None:
        c = self.config
        if self.overlay.contact_count() == 0:  # not joined yet: look again soon, send nothing
            self.set_timer("push", now + c.min_update_interval_s)
            return
        if len(self.suspects) > MAX_SUSPECTS:
            self.suspects = {node_id: until for node_id, until in self.suspects.items() if until > now}
        target = self.preferred_parent(now)
        if target is None:
            was_root = self.is_root
            self._act_as_root()
            self._dirty = False
            self._last_push_at = now
            if not was_root or self._root_by_suspicion(now):
                self._look_for_closer(now)
            self.set_timer("push", now + c.update_interval_s)
            return
        summary = self.summary()
        heartbeat_due = now >= self._last_push_at + c.update_interval_s
        unchanged = self._last_sent == (target.node_id, summary, self._wire_attributes)
        if unchanged and not heartbeat_due and self.parent is not None and self.parent.node_id == target.node_id:
            self._dirty = False
            self.set_timer("push", self._last_push_at + c.update_interval_s)
            return
        self.seq += 1
        msg = AggregateUpdate(self.node_id, self.key, self.epoch, self.seq, self._wire_attributes,
                              summary if self.children else None)
        self.send(target.address, msg)
        self._pending[self.seq] = _Pending(target, msg, summary, 1)
        self.set_timer(("ack", self.seq), now + c.ack_timeout_s)
        self.counters["updates_sent"] += 1
        self._last_sent = (target.node_id, summary, self._wire_attributes)
        self._last_push_at = now
        self._dirty = False
        self.set_timer("push", now + c.update_interval_s)

    def _act_as_root(self) -> None:
        if self.parent is not None:
            self._detach_from(self.parent)
            self.parent = None
        self.grandparent = None
        self.depth = 0
        self.root = self.contact

    def _root_by_suspicion(self, now: float) -> bool:
        own = self.node_id ^ self.key
        return any(until > now and node_id ^ self.key < own for node_id, until in self.suspects.items())

    def _look_for_closer(self, now: float) -> None:
        """Believing we are the root is cheap to check: an overlay lookup of the tree's key
        fills the routing table with the closest live nodes (at most once per interval)."""
        if now - self._lookup_at < self.config.update_interval_s:
            return
        self._lookup_at = now
        self.counters["root_lookups"] += 1
        self._root_lookups.add(self.overlay.lookup(self.key, now))

    def _detach_from(self, contact: Contact) -> None:
        self.counters["detaches_sent"] += 1
        self.send(contact.address, Detach(self.node_id, self.key, self.epoch, self.seq))

    def _on_update(self, src: Address, msg: AggregateUpdate, now: float) -> None:
        if msg.sender == self.node_id or msg.sender ^ self.key <= self.node_id ^ self.key:
            self.dropped["inverted_update"] += 1  # a parent is closer to the key than its child
            return
        entry = self.children.get(msg.sender)
        if entry is not None and entry.epoch == msg.epoch and msg.seq <= entry.seq:
            self.counters["stale_updates"] += 1  # a retransmission or a late copy: ack, keep ours
            self._ack(src, msg)
            return
        if entry is None and len(self.children) >= self.config.max_children:
            self.dropped["too_many_children"] += 1  # no ack: the child will look elsewhere
            return
        attributes = attributes_from_wire(msg.attributes)
        if attributes is None:
            self.dropped["bad_attributes"] += 1
            return
        contact = Contact(msg.sender, src)
        if msg.summary is None:
            summary = summarise(attributes, contact, self.limits)
        elif summary_problem(msg.summary) is None:
            summary = msg.summary
        else:
            self.dropped["bad_summary"] += 1
            return
        changed = entry is None or entry.summary != summary or entry.wire_attributes != msg.attributes
        self.children[msg.sender] = _Child(
            contact, msg.epoch, msg.seq, msg.attributes, attributes, summary, now + self.config.expiry_s
        )
        self.suspects.pop(msg.sender, None)
        self.counters["updates_received"] += 1
        if self.timer_deadline("expire") is None:
            self.set_timer("expire", now + self.config.expiry_s)
        self._ack(src, msg)
        if changed:
            self._changed(now)

    def _ack(self, src: Address, msg: AggregateUpdate) -> None:
        depth = -1 if self.depth is None else self.depth
        self.send(src, AggregateAck(self.node_id, self.key, msg.seq, depth, self.root, self.parent))

    def _on_ack(self, src: Address, msg: AggregateAck, now: float) -> None:
        pending = self._pending.get(msg.seq)
        if pending is None or pending.contact.node_id != msg.sender or pending.contact.address != src:
            self.dropped["unsolicited_ack"] += 1
            return
        contact = pending.contact
        for seq in [s for s, p in self._pending.items() if s <= msg.seq and p.contact.node_id == contact.node_id]:
            del self._pending[seq]  # acks are cumulative: an older update lost on the way no longer matters
            self.cancel_timer(("ack", seq))
        self.suspects.pop(contact.node_id, None)
        if self.parent is None or self.parent.node_id != contact.node_id:
            preferred = self.preferred_parent(now)
            if preferred is None or preferred.node_id != contact.node_id:
                self._detach_from(contact)  # it holds our entry but is no longer our choice
                return
            old, self.parent = self.parent, contact
            self.counters["parent_changes"] += 1
            if old is not None:
                self._detach_from(old)
        self._acked_summary = pending.summary
        self.grandparent = msg.parent if msg.parent is not None and msg.parent.node_id != self.node_id else None
        self.depth = msg.depth + 1 if msg.depth >= 0 else None
        if msg.root is not None and msg.root.node_id != self.node_id:
            self.root = msg.root
        elif msg.depth == 0:
            self.root = contact

    def _on_ack_timeout(self, seq: int, now: float) -> None:
        pending = self._pending.pop(seq, None)
        if pending is None:
            return
        if pending.tries < self.config.update_tries:
            pending.tries += 1
            self._pending[seq] = pending
            self.send(pending.contact.address, pending.msg)
            self.set_timer(("ack", seq), now + self.config.ack_timeout_s)
            return
        node_id = pending.contact.node_id
        self.counters["parents_suspected"] += 1
        self.suspects[node_id] = now + self.config.suspect_s
        for other in [s for s, p in self._pending.items() if p.contact.node_id == node_id]:
            del self._pending[other]
            self.cancel_timer(("ack", other))
        if self.root is not None and self.root.node_id == node_id:
            self.root = None
        if self.parent is not None and self.parent.node_id == node_id:
            self._orphaned(self.parent)
        if self.parent is None or self.parent.node_id == node_id:
            self.parent = None
            self.depth = None
            self._dirty = True
            self.set_timer("push", now)  # repair at once: the rate bound is for refreshes

    def _orphaned(self, lost: Contact) -> None:
        """Our parent stopped answering. Its own parent still counts our subtree through the
        parent's entry, until that expires; tell it to stop, as our new parent will count us."""
        if self.grandparent is not None and self._acked_summary is not None:
            self.counters["orphaned_sent"] += 1
            self.send(self.grandparent.address, Orphaned(self.node_id, self.key, lost.node_id, self._acked_summary))
        self._detach_from(lost)  # in case it is only slow: it must not count us twice either
        self.grandparent = None
        self._acked_summary = None

    def _on_orphaned(self, msg: Orphaned, now: float) -> None:
        entry = self.children.get(msg.lost)
        if entry is None or msg.sender == msg.lost:
            self.counters["stale_orphaned"] += 1
            return
        if summary_problem(msg.summary) is not None:
            self.dropped["bad_summary"] += 1
            return
        entry.orphans[msg.sender] = msg.summary
        self.counters["orphaned_received"] += 1
        self._changed(now)

    def _on_detach(self, msg: Detach, now: float) -> None:
        entry = self.children.get(msg.sender)
        if entry is None or entry.epoch != msg.epoch or entry.seq > msg.seq:
            self.counters["stale_detaches"] += 1
            return
        del self.children[msg.sender]
        self.counters["detaches_received"] += 1
        self._changed(now)

    def _expire(self, now: float) -> None:
        expired = [node_id for node_id, child in self.children.items() if child.expires_at <= now]
        for node_id in expired:
            del self.children[node_id]
        if expired:
            self.counters["children_expired"] += len(expired)
            self._changed(now)
        if self.children:
            self.set_timer("expire", min(child.expires_at for child in self.children.values()))

    # -- answering queries -----------------------------------------------------------------
    def _requirement(self, text: str) -> Requirement | None:
        parsed = self._parsed.get(text)
        if parsed is None:
            try:
                parsed = Requirement.parse(text)
            except ParseError:
                return None
            if len(self._parsed) >= _PARSED_CACHE:
                self._parsed.clear()
            self._parsed[text] = parsed
        return parsed

    def _forward_up(self, msg: Any, now: float) -> bool:
        """Send a request routed to the root one hop up; False when this node is the root."""
        target = self.parent if self.parent is not None else self.preferred_parent(now)
        if target is None:
            return False
        self.counters["requests_forwarded"] += 1
        self.send(target.address, msg)
        return True

    def _on_prospect_request(self, msg: ProspectRequest, now: float) -> None:
        requirement = self._requirement(msg.requirement)
        if (requirement is None or msg.wanted < 1 or msg.hops > MAX_HOPS or len(msg.exclude) > MAX_EXCLUDE
                or msg.offset < 0):
            self.dropped["bad_prospect"] += 1
            return
        if msg.to_root and self._forward_up(_hop(msg), now):
            return
        self.counters["visits_served"] += 1
        reply = self._visit(requirement, msg.wanted, set(msg.exclude), msg.rpc_id, msg.hops, now, msg.offset)
        self.send(msg.requester.address, reply)

    def _visit(
        self, requirement: Requirement, wanted: int, exclude: set[int], rpc_id: int, hops: int, now: float,
        offset: int = 0, page: int | None = None,
    ) -> ProspectReply:
        """What this node knows for a prospect: itself, its matching children, promising subtrees."""
        matches = requirement.evaluate(self.attributes)
        matching: list[_Child] = []
        promising: list[tuple[int, int, _Child]] = []
        for child in self.children.values():
            if child.contact.node_id in exclude or child.expires_at <= now:
                continue
            if requirement.evaluate(child.attributes):
                matching.append(child)
            elif child.summary.nodes > 1:
                bound = match_bound(requirement, child.summary)
                if bound > 0:
                    promising.append((bound, child.summary.nodes, child))
        limit = min(MAX_REPLY_CANDIDATES, wanted * self.config.candidate_factor) if offset == 0 else 0
        chosen = spread_pick(matching, limit, lambda child: child.attributes, self.config.spread)
        picked = {id(child) for child in chosen}
        # matching children not offered are visited like subtrees (a visit verifies them too)
        promising.extend((match_bound(requirement, child.summary), child.summary.nodes, child)
                         for child in matching if id(child) not in picked)
        promising.sort(key=lambda hint: (-hint[0], -hint[1], hint[2].contact.node_id))
        hints = promising[offset : offset + (self.config.max_subtrees if page is None else page)]
        return ProspectReply(
            rpc_id, self.node_id, hops, self.preferred_parent(now) is None,
            matches, self._wire_attributes if matches else {},
            [Candidate(child.contact, child.wire_attributes) for child in chosen],
            [Subtree(child.contact, nodes, bound) for bound, nodes, child in hints],
            max(0, len(promising) - offset - len(hints)),
        )  # fmt: skip

    def _on_aggregate_request(self, msg: AggregateRequest, now: float) -> None:
        if msg.fn not in FUNCTIONS or msg.hops > MAX_HOPS or (msg.attribute == "" and msg.fn != "count"):
            self.dropped["bad_aggregate"] += 1
            return
        if self._forward_up(_hop(msg), now):
            return
        self.counters["aggregates_served"] += 1
        self.send(msg.requester.address, self._answer(msg.rpc_id, msg.attribute, msg.fn, msg.hops))

    def _answer(self, rpc_id: int, attribute: str, fn: str, hops: int) -> AggregateReply:
        summary = self.summary()
        number: int | float | None = None
        values: dict[str, int] = {}
        top: list[TopEntry] = []
        stats = summary.numbers.get(attribute)
        if attribute == "":
            number = summary.nodes
        elif fn == "count":
            number = summary.holders(attribute)
        elif fn in ("sum", "min", "max", "avg"):
            if stats is not None:
                number = {"sum": stats.total, "min": stats.low, "max": stats.high}.get(fn, stats.average)
        elif fn == "top":
            top = list(stats.top) if stats is not None else []
        else:  # values: how many nodes hold each string, set element and boolean
            if attribute in summary.strings:
                values.update(summary.strings[attribute].counts)
            if attribute in summary.sets:
                values.update(summary.sets[attribute].elements)
            trues, falses = summary.booleans.get(attribute, (0, 0))
            if trues:
                values["true"] = trues
            if falses:
                values["false"] = falses
        return AggregateReply(rpc_id, self.node_id, hops, summary.nodes, number, values, top)

    # -- asking: routing to the root, visiting, timeouts -----------------------------------
    def _new_query(self) -> int:
        self._next_query += 1
        return self._next_query

    def _route_up(self, now: float, avoid: Iterable[int] = ()) -> Contact | None:
        """Where to send a request for the root: the cached root, else up the tree."""
        avoided = set(avoid)
        options = (self.root, self.parent, self.preferred_parent(now))
        for contact in options:
            if contact is None or contact.node_id == self.node_id or contact.node_id in avoided:
                continue
            until = self.suspects.get(contact.node_id)
            if until is not None and until > now:
                continue
            return contact
        return None

    def _send_to_root(self, op: _ProspectOp, now: float) -> None:
        target = self._route_up(now, avoid=op.root_targets)
        if target is None:
            return
        if self._rpcs.full:
            op.budget_hit = True
            return
        op.root_targets.append(target.node_id)
        rpc_id = self._request(_Rpc(op.query_id, None, target, "root"), self.config.root_timeout_s, now)
        self.send(target.address, ProspectRequest(rpc_id, self.contact, self.key, str(op.requirement), op.n,
                                                  self._exclude(op), True, 0))
        op.inflight[rpc_id] = None
        op.root_rpc = rpc_id
        op.visits += 1
        op.messages += 1

    def _request(self, rpc: _Rpc, timeout_s: float, now: float) -> int:
        """Wait for the answer to a request about to be sent; its id."""
        expected = rpc.expected
        if expected is None:  # routed to the root: whichever node is the root answers
            return self._rpcs.issue(rpc, now, timeout_s)
        return self._rpcs.issue(rpc, now, timeout_s, address=expected.address, node_id=expected.node_id)

    def _exclude(self, op: _ProspectOp) -> list[int]:
        known = list(op.found) + list(op.candidates)
        known.extend(f.contact.node_id for f in op.inflight.values() if f is not None)
        return list(dict.fromkeys(known))[:MAX_EXCLUDE]

    def _advance_prospect(self, op: _ProspectOp, now: float) -> None:
        c = self.config
        if op.root_rpc is not None:
            return
        while len(op.found) < op.n and len(op.inflight) < c.alpha and len(op.found) + len(op.inflight) < op.n:
            if op.visits >= c.max_visits:
                op.budget_hit = True
                break
            if self._rpcs.full:  # at the node's cap: wait for our answers, or finish with what we have
                op.budget_hit = op.budget_hit or not op.inflight
                break
            if op.candidates:
                used = list(op.found.values()) + [f for f in op.inflight.values() if f is not None]
                pick = next_for_spread(list(op.candidates.values()), used, c.spread)
                del op.candidates[pick.contact.node_id]
                self._visit_node(op, pick.contact, "candidate", pick, now)
            elif op.subtrees:
                *_, offset, contact = heapq.heappop(op.subtrees)
                self._visit_node(op, contact, "subtree", None, now, offset)
            else:
                break
        if len(op.found) >= op.n or not op.inflight:
            self._finish_prospect(op)

    def _visit_node(self, op: _ProspectOp, contact: Contact, kind: str, candidate: FoundNode | None,
                    now: float, offset: int = 0) -> None:
        rpc_id = self._request(_Rpc(op.query_id, contact, contact, kind, offset), self.config.rpc_timeout_s, now)
        wanted = max(1, op.n - len(op.found))
        # a second look sends no exclusions: the node's ranking must not shift, or a subtree is skipped
        exclude = self._exclude(op) if offset == 0 else []
        self.send(contact.address, ProspectRequest(rpc_id, self.contact, self.key, str(op.requirement), wanted,
                                                   exclude, False, 0, offset))
        op.inflight[rpc_id] = candidate
        op.visits += 1
        op.messages += 1

    def _take_rpc(self, src: Address, rpc_id: int, sender: int) -> _Rpc | None:
        request = self._rpcs.reply(rpc_id, src, sender)
        return None if request is None else request.data

    def _on_prospect_reply(self, src: Address, msg: ProspectReply, now: float) -> None:
        rpc = self._take_rpc(src, msg.rpc_id, msg.sender)
        if rpc is None:
            return
        op = self._ops.get(rpc.query_id)
        if not isinstance(op, _ProspectOp):
            return
        op.inflight.pop(msg.rpc_id, None)
        if op.root_rpc == msg.rpc_id:
            op.root_rpc = None
        op.messages += 1 + msg.hops
        self._absorb(op, Contact(msg.sender, src), msg, now, rpc.offset)
        self._advance_prospect(op, now)

    def _absorb(self, op: _ProspectOp, sender: Contact, msg: ProspectReply, now: float, offset: int = 0) -> None:
        op.seen.add(sender.node_id)
        op.candidates.pop(sender.node_id, None)
        if msg.is_root and sender.node_id != self.node_id:
            self.root = sender
        if msg.matches:
            attributes = self.attributes if sender.node_id == self.node_id else attributes_from_wire(msg.attributes)
            if attributes is not None and op.requirement.evaluate(attributes):
                op.found[sender.node_id] = FoundNode(sender, attributes)
            else:
                self.dropped["false_match"] += 1
        for candidate in msg.candidates[:MAX_REPLY_CANDIDATES]:
            node_id = candidate.contact.node_id
            if node_id in op.seen:
                continue
            attributes = attributes_from_wire(candidate.attributes)
            if attributes is None or not op.requirement.evaluate(attributes):
                self.dropped["false_candidate"] += 1
                continue
            op.seen.add(node_id)
            found = FoundNode(candidate.contact, attributes)
            if self.config.verify_candidates:
                op.candidates[node_id] = found
            else:
                op.found[node_id] = found
        subtrees = msg.subtrees if sender.node_id == self.node_id else msg.subtrees[: self.config.max_subtrees]
        for subtree in subtrees:
            node_id = subtree.contact.node_id
            if node_id in op.seen:
                continue
            op.seen.add(node_id)
            heapq.heappush(op.subtrees, (-subtree.bound, -subtree.nodes, node_id, 0, subtree.contact))
        if msg.more > 0 and subtrees and sender.node_id != self.node_id:
            # the rest of its list ranks below what it sent: look again once these are explored
            heapq.heappush(op.subtrees, (-subtrees[-1].bound, 0, sender.node_id, offset + len(subtrees), sender))

    def _on_rpc_timeout(self, timer_name: Hashable, now: float) -> None:
        request = self._rpcs.timed_out(timer_name)
        if request is None:
            return
        rpc_id, rpc = request.request_id, request.data
        self.counters["query_timeouts"] += 1
        op = self._ops.get(rpc.query_id)
        if isinstance(op, _ProspectOp):
            op.inflight.pop(rpc_id, None)
            op.timeouts += 1
            if op.root_rpc == rpc_id:
                op.root_rpc = None
            if rpc.kind == "root":
                if self.root is not None and self.root.node_id == rpc.target.node_id:
                    self.root = None  # stale or slow: go parent by parent next time
                if len(op.root_targets) < 2:
                    self._send_to_root(op, now)
            self._advance_prospect(op, now)
        elif isinstance(op, _AggregateOp):
            if self.root is not None and self.root.node_id == rpc.target.node_id:
                self.root = None
            if op.tries < 2 and self._send_aggregate(op, now):
                return
            self._aggregate_failed(op)

    def _finish_prospect(self, op: _ProspectOp) -> None:
        self._ops.pop(op.query_id, None)
        for rpc_id in list(op.inflight):  # answers still on the way no longer matter
            self._rpcs.end(rpc_id)
        nodes = spread_pick(list(op.found.values()), op.n, lambda f: f.attributes, self.config.spread)
        exhausted = not op.candidates and not op.subtrees and not op.budget_hit
        self.emit(ProspectFinished(
            op.query_id, str(op.requirement), op.n, nodes, len(op.found), op.visits, op.messages, exhausted,
            op.timeouts,
        ))  # fmt: skip

    def _send_aggregate(self, op: _AggregateOp, now: float) -> bool:
        target = self._route_up(now)
        if target is None or self._rpcs.full:
            return False
        op.tries += 1
        rpc_id = self._request(_Rpc(op.query_id, None, target, "aggregate"), self.config.root_timeout_s, now)
        self.send(target.address, AggregateRequest(rpc_id, self.contact, self.key, op.attribute or "", op.fn, 0))
        op.messages += 1
        return True

    def _aggregate_failed(self, op: _AggregateOp) -> None:
        self._ops.pop(op.query_id, None)
        self.emit(AggregateFinished(op.query_id, op.attribute, op.fn, None, 0, None, op.messages, False))

    def _on_aggregate_reply(self, src: Address, msg: AggregateReply, now: float) -> None:
        rpc = self._take_rpc(src, msg.rpc_id, msg.sender)
        if rpc is None:
            return
        op = self._ops.pop(rpc.query_id, None)
        if not isinstance(op, _AggregateOp):
            return
        op.messages += 1 + msg.hops
        self.root = Contact(msg.sender, src) if msg.sender != self.node_id else self.root
        self._finish_aggregate(op, msg, msg.sender, ok=True)

    def _finish_aggregate(self, op: _AggregateOp, reply: AggregateReply, root: int, *, ok: bool) -> None:
        value: Any
        if op.fn == "top":
            value = list(reply.top)
        elif op.fn == "values":
            value = dict(reply.values)
        else:
            value = reply.number
        self.emit(AggregateFinished(op.query_id, op.attribute, op.fn, value, reply.nodes, root, op.messages, ok))


def _hop(msg: Any) -> Any:
    return replace(msg, hops=msg.hops + 1)


# -- spread ---------------------------------------------------------------------------------


def spread_pick(items: Sequence[T], n: int, attributes_of: Callable[[T], Mapping[str, Any]],
                keys: Sequence[str]) -> list[T]:
    """Up to ``n`` of ``items``, greedily preferring values of ``keys`` not chosen yet
    (different owners, different regions); ties keep the order of ``items``."""
    chosen: list[T] = []
    used: dict[str, set[Any]] = {key: set() for key in keys}
    remaining = list(items)
    while remaining and len(chosen) < n:
        best_index, best_score = 0, -1
        for index, item in enumerate(remaining):
            attributes = attributes_of(item)
            score = sum(1 for key in keys if attributes.get(key) not in used[key])
            if score > best_score:
                best_index, best_score = index, score
                if score == len(keys):
                    break
        item = remaining.pop(best_index)
        chosen.append(item)
        attributes = attributes_of(item)
        for key in keys:
            used[key].add(attributes.get(key))
    return chosen


def next_for_spread(candidates: Sequence[FoundNode], chosen: Sequence[FoundNode], keys: Sequence[str]) -> FoundNode:
    """The candidate that adds the most new owner/region values to ``chosen``."""
    used: dict[str, set[Any]] = {key: {f.attributes.get(key) for f in chosen} for key in keys}
    return max(
        enumerate(candidates),
        key=lambda pair: (sum(1 for key in keys if pair[1].attributes.get(key) not in used[key]), -pair[0]),
    )[1]


__all__ = [
    "FUNCTIONS",
    "MESSAGES",
    "AggregateAck",
    "AggregateFinished",
    "AggregateReply",
    "AggregateRequest",
    "AggregateUpdate",
    "Candidate",
    "Detach",
    "FoundNode",
    "Orphaned",
    "ProspectFinished",
    "ProspectReply",
    "ProspectRequest",
    "Prospector",
    "ProspectorConfig",
    "Subtree",
    "spread_pick",
]
