"""The resource prospector's queries: prospects and aggregates, answered from the aggregation tree.

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

Not here: the tree the queries read (:mod:`p2pdeploy.collective.aggregation_tree`), and the
protocol object that hosts both (:class:`~p2pdeploy.collective.prospector.Prospector`).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from p2pdeploy.collective.aggregation import TopEntry, WireValue, attributes_from_wire, match_bound
from p2pdeploy.collective.aggregation_tree import AggregationTree, Child
from p2pdeploy.collective.prospector_config import ProspectorConfig
from p2pdeploy.core import Address, Protocol, Rng
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.requirements import MAX_SOURCE_CHARS, ParseError, Requirement
from p2pdeploy.wire import NodeId, message, record

#: What ``aggregate`` can compute at the root.
FUNCTIONS = ("count", "sum", "min", "max", "avg", "top", "values")
#: A request routed to the root gives up after this many forwards (stale caches cannot loop it).
MAX_HOPS = 32
#: Node ids a querier lists as already known, so visited nodes do not offer them again.
MAX_EXCLUDE = 64
MAX_REPLY_CANDIDATES = 32
#: Query requests (visits, requests to the root) waiting for answers at once. At the cap a query
#: makes no further visit until an answer frees a slot; one with nothing in flight finishes with
#: what it has (not exhausted, as when out of budget), and an aggregate that cannot ask fails.
MAX_RPCS = 4096
_PARSED_CACHE = 128

T = TypeVar("T")

# -- messages (wire tags 83-86) -------------------------------------------------------------


@record
class Candidate:
    """A node offered by its parent: its contact and its attributes from its last update."""

    contact: Contact
    attributes: dict[str, WireValue]


@record
class Subtree:
    """A child whose subtree may hold a match: at most ``bound`` of its ``nodes`` nodes do."""

    contact: Contact
    nodes: int
    bound: int


@message(83)
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
class AggregateRequest:
    """A global question for the root (``attribute`` "" is the node count)."""

    rpc_id: int
    requester: Contact
    tree: NodeId
    attribute: str
    fn: str
    hops: int


@message(86)
class AggregateReply:
    rpc_id: int
    sender: NodeId
    hops: int
    nodes: int
    number: int | float | None
    values: dict[str, int]
    top: list[TopEntry]


QUERY_MESSAGES = (ProspectRequest, ProspectReply, AggregateRequest, AggregateReply)

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


# -- state ----------------------------------------------------------------------------------


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


class ProspectorQueries:
    """One node's prospect and aggregate queries, asked and answered over its
    :class:`~p2pdeploy.collective.aggregation_tree.AggregationTree`; hosted by a protocol object
    (the :class:`~p2pdeploy.collective.prospector.Prospector`) that sends, emits, holds the timers
    and counts dropped input, with the work counted in the shared ``counters``."""

    def __init__(self, host: Protocol, tree: AggregationTree, rng: Rng, config: ProspectorConfig,
                 counters: Counter[str], max_rpcs: int = MAX_RPCS) -> None:
        self.host = host
        self.tree = tree
        self.node_id = tree.node_id
        self.contact = tree.contact
        self.key = tree.key
        self.config = config
        self.counters = counters
        #: Query requests waiting for their answer (from ``_Rpc.expected``, or any root).
        self._rpcs: RequestTracker[_Rpc] = RequestTracker(host, "rpc", rng=rng, id_bits=62, limit=max_rpcs)
        self._ops: dict[int, _ProspectOp | _AggregateOp] = {}
        self._next_query = 0
        self._parsed: dict[str, Requirement] = {}

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
        self._absorb(op, self.contact, self._visit(parsed, n, set(), 0, 0, now, page=len(self.tree.children)), now)
        if self.tree.preferred_parent(now) is not None:
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
        if self.tree.preferred_parent(now) is None:
            reply = self._answer(0, attribute or "", fn, 0)
            self._finish_aggregate(op, reply, self.node_id, ok=True)
            return op.query_id
        self._ops[op.query_id] = op
        if not self._send_aggregate(op, now):
            self._aggregate_failed(op)
        return op.query_id

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
        target = self.tree.parent if self.tree.parent is not None else self.tree.preferred_parent(now)
        if target is None:
            return False
        self.counters["requests_forwarded"] += 1
        self.host.send(target.address, msg)
        return True

    def _on_prospect_request(self, msg: ProspectRequest, now: float) -> None:
        requirement = self._requirement(msg.requirement)
        if (requirement is None or msg.wanted < 1 or msg.hops > MAX_HOPS or len(msg.exclude) > MAX_EXCLUDE
                or msg.offset < 0):
            self.host.dropped["bad_prospect"] += 1
            return
        if msg.to_root and self._forward_up(_hop(msg), now):
            return
        self.counters["visits_served"] += 1
        reply = self._visit(requirement, msg.wanted, set(msg.exclude), msg.rpc_id, msg.hops, now, msg.offset)
        self.host.send(msg.requester.address, reply)

    def _visit(
        self, requirement: Requirement, wanted: int, exclude: set[int], rpc_id: int, hops: int, now: float,
        offset: int = 0, page: int | None = None,
    ) -> ProspectReply:
        """What this node knows for a prospect: itself, its matching children, promising subtrees."""
        matches = requirement.evaluate(self.tree.attributes)
        matching: list[Child] = []
        promising: list[tuple[int, int, Child]] = []
        for child in self.tree.children.values():
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
            rpc_id, self.node_id, hops, self.tree.preferred_parent(now) is None,
            matches, self.tree.wire_attributes if matches else {},
            [Candidate(child.contact, child.wire_attributes) for child in chosen],
            [Subtree(child.contact, nodes, bound) for bound, nodes, child in hints],
            max(0, len(promising) - offset - len(hints)),
        )  # fmt: skip

    def _on_aggregate_request(self, msg: AggregateRequest, now: float) -> None:
        if msg.fn not in FUNCTIONS or msg.hops > MAX_HOPS or (msg.attribute == "" and msg.fn != "count"):
            self.host.dropped["bad_aggregate"] += 1
            return
        if self._forward_up(_hop(msg), now):
            return
        self.counters["aggregates_served"] += 1
        self.host.send(msg.requester.address, self._answer(msg.rpc_id, msg.attribute, msg.fn, msg.hops))

    def _answer(self, rpc_id: int, attribute: str, fn: str, hops: int) -> AggregateReply:
        summary = self.tree.summary()
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
        tree = self.tree
        options = (tree.root, tree.parent, tree.preferred_parent(now))
        for contact in options:
            if contact is None or contact.node_id == self.node_id or contact.node_id in avoided:
                continue
            if tree.is_suspected(contact.node_id, now):
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
        self.host.send(target.address, ProspectRequest(rpc_id, self.contact, self.key, str(op.requirement), op.n,
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
        self.host.send(contact.address, ProspectRequest(rpc_id, self.contact, self.key, str(op.requirement), wanted,
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
        if msg.is_root:
            self.tree.root_answered(sender)
        if msg.matches:
            attributes = self.tree.attributes if sender.node_id == self.node_id else attributes_from_wire(msg.attributes)
            if attributes is not None and op.requirement.evaluate(attributes):
                op.found[sender.node_id] = FoundNode(sender, attributes)
            else:
                self.host.dropped["false_match"] += 1
        for candidate in msg.candidates[:MAX_REPLY_CANDIDATES]:
            node_id = candidate.contact.node_id
            if node_id in op.seen:
                continue
            attributes = attributes_from_wire(candidate.attributes)
            if attributes is None or not op.requirement.evaluate(attributes):
                self.host.dropped["false_candidate"] += 1
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
                self.tree.root_silent(rpc.target.node_id)  # stale or slow: go parent by parent next time
                if len(op.root_targets) < 2:
                    self._send_to_root(op, now)
            self._advance_prospect(op, now)
        elif isinstance(op, _AggregateOp):
            self.tree.root_silent(rpc.target.node_id)
            if op.tries < 2 and self._send_aggregate(op, now):
                return
            self._aggregate_failed(op)

    def _finish_prospect(self, op: _ProspectOp) -> None:
        self._ops.pop(op.query_id, None)
        for rpc_id in list(op.inflight):  # answers still on the way no longer matter
            self._rpcs.end(rpc_id)
        nodes = spread_pick(list(op.found.values()), op.n, lambda f: f.attributes, self.config.spread)
        exhausted = not op.candidates and not op.subtrees and not op.budget_hit
        self.host.emit(ProspectFinished(
            op.query_id, str(op.requirement), op.n, nodes, len(op.found), op.visits, op.messages, exhausted,
            op.timeouts,
        ))  # fmt: skip

    def _send_aggregate(self, op: _AggregateOp, now: float) -> bool:
        target = self._route_up(now)
        if target is None or self._rpcs.full:
            return False
        op.tries += 1
        rpc_id = self._request(_Rpc(op.query_id, None, target, "aggregate"), self.config.root_timeout_s, now)
        self.host.send(target.address, AggregateRequest(rpc_id, self.contact, self.key, op.attribute or "", op.fn, 0))
        op.messages += 1
        return True

    def _aggregate_failed(self, op: _AggregateOp) -> None:
        self._ops.pop(op.query_id, None)
        self.host.emit(AggregateFinished(op.query_id, op.attribute, op.fn, None, 0, None, op.messages, False))

    def _on_aggregate_reply(self, src: Address, msg: AggregateReply, now: float) -> None:
        rpc = self._take_rpc(src, msg.rpc_id, msg.sender)
        if rpc is None:
            return
        op = self._ops.pop(rpc.query_id, None)
        if not isinstance(op, _AggregateOp):
            return
        op.messages += 1 + msg.hops
        self.tree.root_answered(Contact(msg.sender, src))
        self._finish_aggregate(op, msg, msg.sender, ok=True)

    def _finish_aggregate(self, op: _AggregateOp, reply: AggregateReply, root: int, *, ok: bool) -> None:
        value: Any
        if op.fn == "top":
            value = list(reply.top)
        elif op.fn == "values":
            value = dict(reply.values)
        else:
            value = reply.number
        self.host.emit(AggregateFinished(op.query_id, op.attribute, op.fn, value, reply.nodes, root, op.messages, ok))

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is ProspectRequest:
            self._on_prospect_request(msg, now)
        elif kind is ProspectReply:
            self._on_prospect_reply(src, msg, now)
        elif kind is AggregateRequest:
            self._on_aggregate_request(msg, now)
        elif kind is AggregateReply:
            self._on_aggregate_reply(src, msg, now)
        else:
            self.host.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> bool:
        """Run the queries' timer ``name``; False when it is not one of theirs."""
        if not self._rpcs.owns(name):
            return False
        self._on_rpc_timeout(name, now)
        return True


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
    "MAX_RPCS",
    "QUERY_MESSAGES",
    "AggregateFinished",
    "AggregateReply",
    "AggregateRequest",
    "Candidate",
    "FoundNode",
    "ProspectFinished",
    "ProspectReply",
    "ProspectRequest",
    "ProspectorQueries",
    "Subtree",
    "next_for_spread",
    "spread_pick",
]
