"""Broadcast over the Kademlia routing table without flooding (after El-Ansary et al., 2003).

El-Ansary, Alima, Brand and Haridi ("Efficient broadcast in structured P2P networks", IPTPS
2003) broadcast on Chord by handing each finger the arc up to the next finger, so every node
gets the message once and the tree is O(log N) deep. On Kademlia's XOR tree the arcs are
*prefix blocks*: a node responsible for the block of ids that share its first ``depth`` bits
splits it into its own sibling subtrees (the blocks at depths ``depth+1 .. 160`` that differ
from its id in the last bit of the prefix, which its k-buckets cover), sends the message to one
contact it knows in each non-empty one and hands that contact the block. The initiator holds the
whole space (depth 0). Blocks never overlap, so in a static network with sound routing tables
every node receives the message exactly once: N-1 data messages, and the depth is about log2 N
(every hand-off lengthens the prefix a node shares with the receivers below it).

We hand off whole sibling subtrees rather than single buckets: with relaxed bucket splitting
(``b > 1``) a sibling subtree may be cut into several buckets, and a bucket the table has no
contact in would lose its block, while the contact we pick inside the subtree knows that part
of it better than we do (it is close to it). Among a subtree's contacts we prefer the two heard
from most recently (the tail of Kademlia's least-recently-seen order), and avoid for
``suspect_s`` a contact that failed us.

Routing tables have holes: a node that joined early may know nobody in a sibling subtree that
filled up later (nothing repairs it before the next bucket refresh). A sibling subtree we know
nobody in is taken for empty only when the network is small enough that it may be (fewer than
``hole_nodes`` nodes expected there, from the size estimate i 2^160 / distance to our i-th
closest contact); otherwise its block goes to a *proxy*: the known contact closest to the block
if it is closer than we are, else one in the block's parent. A proxy hands the block to a member
it knows, or to a proxy of its own, at most ``max_proxy_hops`` in a row. A block whose every
known member failed is passed to a proxy the same way.

Two modes:

- **best effort**: send and forget. A dead or stale contact loses its block.
- **reliable**: a delegate answers at once: ``BroadcastAck(done=True)`` when it had nothing to
  hand on (a leaf), else ``done=False`` (the hop acknowledgement), which it repeats every
  ``progress_interval_s`` while the delegations that block waits for are under way, and
  ``done=True`` when they are all done. A delegate that does not accept within
  ``ack_timeout_s``, or falls silent for ``progress_misses`` intervals, is replaced by another
  contact of the same block, or a proxy (re-delegation), up to ``max_attempts`` contacts; a block
  left with no candidate is given up and counted. The initiator emits ``BroadcastCompleted``.
  A node handed a block again (after a re-delegation) forwards only the parts it has not
  handled yet, and a proxy asked again for a block it passes on already answers done at once,
  so chains of proxies never wait on each other in a circle.

Every node delivers a broadcast once (deduplicated by its id for ``seen_ttl_s``).
The engine, :class:`PrefixSpreader`, is shared with the member trees of
:mod:`p2pdeploy.overlay.multicast`, which run the same algorithm over a group's member view.
This module is not a failure detector for the routing table: Kademlia learns nothing from it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.suspicion import Suspicions
from p2pdeploy.wire import ID_BITS, NodeId, message

# -- prefix blocks --------------------------------------------------------------------------


def block_low(node_id: int, depth: int) -> int:
    """The lowest id of the prefix block of ``depth`` bits that holds ``node_id``."""
    shift = ID_BITS - depth
    return (node_id >> shift) << shift


def sibling_low(node_id: int, depth: int) -> int:
    """The lowest id of ``node_id``'s sibling subtree at ``depth`` (1..160): the ids that share
    its first ``depth - 1`` bits and differ in bit ``depth``."""
    shift = ID_BITS - depth
    return ((node_id >> shift) ^ 1) << shift


def sibling_depth(own_id: int, other: int) -> int:
    """The depth of the sibling subtree of ``own_id`` that holds ``other`` (1..160)."""
    return ID_BITS - (own_id ^ other).bit_length() + 1


def in_block(node_id: int, low: int, depth: int) -> bool:
    return depth == 0 or block_low(node_id, depth) == low


def valid_block(low: int, depth: int) -> bool:
    """True when ``(low, depth)`` names a prefix block of the id space."""
    return 0 <= depth <= ID_BITS and 0 <= low < (1 << ID_BITS) and low == block_low(low, depth)


def group_by_sibling(own_id: int, contacts: Iterable[Contact], deeper_than: int = 0) -> dict[int, list[Contact]]:
    """``contacts`` by the sibling subtree of ``own_id`` they lie in, for depths > ``deeper_than``."""
    groups: dict[int, list[Contact]] = {}
    for contact in contacts:
        if contact.node_id == own_id:
            continue
        depth = sibling_depth(own_id, contact.node_id)
        if depth > deeper_than:
            groups.setdefault(depth, []).append(contact)
    return groups


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpreadConfig:
    """Reliability knobs of a tree dissemination (broadcast, or a multicast member tree)."""

    #: Reliable mode: a delegate that does not accept its block within this is replaced.
    ack_timeout_s: float = 1.0
    #: Reliable mode: a delegate still working reports progress this often...
    progress_interval_s: float = 1.0
    #: ...and one silent for this many intervals is replaced.
    progress_misses: int = 3
    #: Contacts tried per block before the block is given up (a block near the top of the
    #: tree holds half the network: give up only when the known candidates are exhausted).
    max_attempts: int = 16
    #: A sibling subtree in which we know nobody is a hole in our table, not an empty part of the
    #: id space, when it should hold at least this many nodes (the network's size is estimated
    #: from the distance to our closest contacts); its block goes to a proxy, which may know them.
    hole_nodes: float = 8.0
    #: A block passes through at most this many proxies before it is given up.
    max_proxy_hops: int = 3
    #: A delegate that failed is avoided (tried last) for this long.
    suspect_s: float = 120.0
    #: How long a message id is remembered, so a late copy is not delivered twice.
    seen_ttl_s: float = 300.0
    #: Largest payload the API accepts (larger messages travel by stream: keep them reasonable).
    max_payload_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        require_positive(self, "broadcast.", "ack_timeout_s", "progress_interval_s", "seen_ttl_s", "suspect_s")
        require_at_least(self, "broadcast.", 1, "progress_misses", "max_attempts", "max_payload_bytes",
                         "max_proxy_hops")
        require_positive(self, "broadcast.", "hole_nodes")


BroadcastConfig = SpreadConfig

# -- messages -------------------------------------------------------------------------------


@message(60)
class BroadcastData:
    """The message, handed to a node with the block ``(low, depth)`` it is now responsible for."""

    broadcast_id: int
    origin: NodeId
    sender: NodeId
    low: NodeId
    depth: int
    hops: int
    reliable: bool
    topic: str
    payload: bytes
    #: Proxies the block passed through (0: the receiver lies in it).
    proxies: int = 0


@message(61)
class BroadcastAck:
    """Reliable mode: the block ``(low, depth)`` was accepted (``done=False``, repeated as
    progress) or is entirely done (``done=True``)."""

    broadcast_id: int
    sender: NodeId
    low: NodeId
    depth: int
    done: bool


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BroadcastDelivered:
    """A broadcast reached this node (once per broadcast id); ``hops`` from the initiator."""

    broadcast_id: int
    origin: int
    topic: str
    payload: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class BroadcastCompleted:
    """Reliable mode, at the initiator: every block was acknowledged as done or given up."""

    broadcast_id: int
    #: Blocks given up after ``max_attempts`` contacts failed (0 when the broadcast is complete
    #: as far as the routing tables knew).
    unreached_blocks: int


# -- the engine -----------------------------------------------------------------------------

Block = tuple[int, int]  # (low, depth)


@dataclass(slots=True)
class _Delegation:
    low: int
    depth: int
    contact: Contact
    tried: list[Contact]
    #: Proxies the block had passed through when it reached us.
    proxies: int = 0
    accepted: bool = False
    done: bool = False


@dataclass(slots=True)
class _Parent:
    """Who handed us the block ``(low, depth)``, and the delegations its completion waits for."""

    address: Address
    low: int
    depth: int
    waits_for: set[Block]


@dataclass(slots=True)
class SpreadState:
    """One message at one node: what it holds and which blocks it handed to whom."""

    stream: int
    msg_id: int
    info: Any
    reliable: bool
    #: This node is responsible for its own prefix block of this depth (160: only itself).
    covered_depth: int = ID_BITS
    #: Hops from the origin of the copy that reached us first (0 at the origin).
    hops: int = 0
    finished: bool = True
    origin: bool = False
    #: A publisher outside a group hands the whole space to one of these entry members.
    handoff: list[Contact] | None = None
    #: Reliable mode: who handed us which block, still waiting to hear that it is done.
    parents: list[_Parent] = field(default_factory=list)
    #: Reliable mode: the blocks we handed on, and to whom.
    delegations: dict[Block, _Delegation] = field(default_factory=dict)
    #: Blocks we were asked to pass on as a proxy (they do not hold us).
    proxied: set[Block] = field(default_factory=set)
    unreached: int = 0


class PrefixSpreader(Protocol):
    """The El-Ansary engine over prefix blocks; subclasses say who is known and what is sent.

    Hooks: :meth:`_known` (contacts of a stream), :meth:`_closest` (the known contacts closest
    to an id), :meth:`_data_message`, :meth:`_ack_message`, :meth:`_on_delivered` (first copy at
    this node), :meth:`_on_completed` (an origin's reliable message is done) and
    :meth:`_on_forward` (a message leaves this node, for the counters). Timers named
    ``("spread", ...)`` belong to the engine: call :meth:`_spread_timer` from ``on_timer``.
    """

    def __init__(self, own_id: int, rng: Rng, suspicions: Suspicions, config: SpreadConfig | None = None) -> None:
        super().__init__()
        self.own_id = own_id
        self.rng = rng
        self.spread_config = config or SpreadConfig()
        self._spreads: dict[tuple[int, int], SpreadState] = {}
        #: The node's suspicions (the overlay's: one list for every layer).
        self.suspicions = suspicions
        self.spread_counters: dict[str, int] = {"proxied": 0, "redelegated": 0, "given_up": 0}

    # -- hooks -----------------------------------------------------------------------------
    def _known(self, stream: int) -> Iterable[Contact]:
        raise NotImplementedError

    def _closest(self, stream: int, target: int, count: int) -> list[Contact]:
        return sorted(self._known(stream), key=lambda c: c.node_id ^ target)[:count]

    def _data_message(self, spread: SpreadState, low: int, depth: int, hops: int, proxies: int) -> Any:
        raise NotImplementedError

    def _ack_message(self, stream: int, msg_id: int, low: int, depth: int, done: bool) -> Any:
        raise NotImplementedError

    def _on_delivered(self, spread: SpreadState, hops: int, now: float) -> None:
        pass

    def _on_completed(self, spread: SpreadState, now: float) -> None:
        pass

    def _on_forward(self, spread: SpreadState, reliable_ack: bool = False) -> None:
        pass

    # -- starting and receiving ------------------------------------------------------------
    def _spread_start(self, stream: int, msg_id: int, info: Any, reliable: bool, now: float,
                      *, deliver: bool = False) -> SpreadState:
        """This node originates a message: it is responsible for the whole space."""
        spread = self._remember(stream, msg_id, info, reliable, now)
        spread.origin = True
        if deliver:
            self._on_delivered(spread, 0, now)
        self._extend(spread, 0, now)
        self._check_finished(spread, now)
        return spread

    def _spread_handoff(self, stream: int, msg_id: int, info: Any, reliable: bool,
                        entries: list[Contact], now: float) -> SpreadState:
        """Hand the whole space to one of ``entries`` (a publisher outside the group)."""
        spread = self._remember(stream, msg_id, info, reliable, now)
        spread.origin = True
        spread.handoff = [c for c in entries if c.node_id != self.own_id]
        spread.covered_depth = 0
        if not self._delegate_block(spread, 0, 0, [], now):
            spread.unreached += 1
        self._check_finished(spread, now)
        return spread

    def _spread_receive(self, src: Address, stream: int, msg_id: int, info: Any, low: int, depth: int,
                        hops: int, reliable: bool, now: float, *, proxies: int = 0) -> None:
        """A data message handed us the block ``(low, depth)`` (as a proxy if it does not hold us)."""
        if not valid_block(low, depth):
            self.dropped["bad_block"] += 1
            return
        spread = self._spreads.get((stream, msg_id))
        if spread is None:
            spread = self._remember(stream, msg_id, info, reliable, now)
            spread.hops = hops
            self._on_delivered(spread, hops, now)
        elif spread.handoff is not None:
            self.dropped["own_message"] += 1  # a handoff came back to its publisher
            return
        spread.reliable = spread.reliable or reliable
        block = (low, depth)
        if in_block(self.own_id, low, depth):
            self._extend(spread, depth, now)
            waits_for = {b for b in spread.delegations if b[1] > depth and b not in spread.proxied}
        elif block in spread.delegations or block in spread.proxied:
            waits_for = set()  # we hand it on already: answering at once keeps proxies from waiting in a circle
        else:
            spread.proxied.add(block)
            self.spread_counters["proxied"] += 1
            self._delegate_block(spread, low, depth, [], now, proxies=proxies)
            waits_for = {block} if block in spread.delegations else set()
        if reliable:
            pending = {b for b in waits_for if not spread.delegations[b].done}
            if pending:
                spread.parents.append(_Parent(src, low, depth, pending))
                self._send_ack(spread, src, low, depth, False)  # accepted now, done later
            else:
                self._send_ack(spread, src, low, depth, True)  # nothing to wait for: done at once
        self._check_finished(spread, now)

    def _extend(self, spread: SpreadState, depth: int, now: float) -> None:
        """Become responsible for our block of ``depth``: hand on the sibling subtrees we do not cover yet."""
        if depth >= spread.covered_depth:
            return
        groups = group_by_sibling(self.own_id, self._known(spread.stream), deeper_than=depth)
        populated = self._populated_depth(spread.stream)
        for sibling in range(depth + 1, spread.covered_depth + 1):
            inside = groups.get(sibling)
            if inside or sibling <= populated:
                self._delegate_block(spread, sibling_low(self.own_id, sibling), sibling, [], now, inside=inside or [])
        spread.covered_depth = depth

    def _delegate_block(self, spread: SpreadState, low: int, depth: int, tried: list[Contact], now: float,
                        *, inside: list[Contact] | None = None, proxies: int = 0) -> bool:
        """Hand the block to a contact inside it, or else to a proxy (see :meth:`_proxy_for`);
        False when there is nobody to hand it to."""
        tried_ids = {c.node_id for c in tried}
        if spread.handoff is not None and depth == 0:
            pool = spread.handoff
        elif inside is not None:
            pool = inside
        else:
            pool = [c for c in self._known(spread.stream) if in_block(c.node_id, low, depth)]
        candidates = [c for c in pool if c.node_id not in tried_ids and c.node_id != self.own_id]
        if candidates:
            fresh = [c for c in candidates if not self._suspected(c.node_id, now)]
            contact = self.rng.choice(self._preferred(fresh or candidates))
            sent_proxies = 0
        else:
            if proxies >= self.spread_config.max_proxy_hops:
                return False
            contact = self._proxy_for(spread, low, depth, tried_ids, now)
            if contact is None:
                return False
            sent_proxies = proxies + 1
        self.send(contact.address, self._data_message(spread, low, depth, spread.hops + 1, sent_proxies))
        self._on_forward(spread)
        if spread.reliable:
            spread.delegations[(low, depth)] = _Delegation(low, depth, contact, [*tried, contact], proxies)
            self.set_timer(("spread", "wait", spread.stream, spread.msg_id, low, depth),
                           now + self.spread_config.ack_timeout_s)
        return True

    def _populated_depth(self, stream: int) -> int:
        """The deepest sibling depth whose subtree should hold ``hole_nodes`` nodes or more.

        The network's size is estimated as i 2^160 / (distance to our i-th closest contact), the
        median over our 8 closest: one hole among them does not throw it off."""
        closest = self._closest(stream, self.own_id, 8)
        if len(closest) < 4:
            return 0
        estimate = statistics.median((i + 1) * (1 << ID_BITS) / max(1, c.node_id ^ self.own_id)
                                     for i, c in enumerate(closest))
        ratio = estimate / self.spread_config.hole_nodes
        return max(0, math.floor(math.log2(ratio))) if ratio >= 1 else 0

    def _proxy_for(self, spread: SpreadState, low: int, depth: int, tried_ids: set[int], now: float) -> Contact | None:
        """Who passes on a block we know no live member of: the known contact closest to it if it
        is closer than we are, else one in the block's parent (the other half of the split: its
        table covers the block as well as ours, and may not have our hole). Suspected contacts only
        as a last resort; the proxy count in the message bounds the chain."""
        own = self.own_id ^ low
        outside = [c for c in self._closest(spread.stream, low, 8)
                   if c.node_id not in tried_ids and c.node_id != self.own_id and not in_block(c.node_id, low, depth)]
        choices = [c for c in outside if c.node_id ^ low < own]
        if not choices and depth > 0:
            parent = block_low(low, depth - 1)
            choices = [c for c in self._known(spread.stream) if c.node_id not in tried_ids and c.node_id != self.own_id
                       and in_block(c.node_id, parent, depth - 1) and not in_block(c.node_id, low, depth)]
            choices.sort(key=lambda c: c.node_id ^ low)
        fresh = [c for c in choices if not self._suspected(c.node_id, now)]
        return (fresh or choices or [None])[0]

    def _preferred(self, candidates: list[Contact]) -> list[Contact]:
        """The candidates to draw a delegate from (all of them; a subclass may prefer some)."""
        return candidates

    def _spread_ack(self, src: Address, stream: int, msg_id: int, low: int, depth: int, done: bool,
                    now: float) -> None:
        spread = self._spreads.get((stream, msg_id))
        delegation = spread.delegations.get((low, depth)) if spread is not None else None
        if delegation is None or not any(c.address == src for c in delegation.tried):
            self.dropped["unexpected_ack"] += 1
            return
        assert spread is not None
        if delegation.done:
            return  # a late copy: the block is settled
        if done:
            delegation.done = True
            self.cancel_timer(("spread", "wait", stream, msg_id, low, depth))
            self._check_finished(spread, now)
            return
        if delegation.contact.address != src:
            return  # progress from a delegate we already replaced: its done still counts
        delegation.accepted = True
        c = self.spread_config
        self.set_timer(("spread", "wait", stream, msg_id, low, depth), now + c.progress_interval_s * c.progress_misses)

    def _check_finished(self, spread: SpreadState, now: float) -> None:
        """Tell each parent whose block is done; report an origin's completion."""
        if not spread.reliable:
            spread.finished = True
            return
        pending = {b for b, d in spread.delegations.items() if not d.done}
        still_waiting = []
        for parent in spread.parents:
            parent.waits_for &= pending
            if parent.waits_for:
                still_waiting.append(parent)
            else:
                self._send_ack(spread, parent.address, parent.low, parent.depth, True)
        spread.parents = still_waiting
        progress = ("spread", "progress", spread.stream, spread.msg_id)
        if not still_waiting:
            self.cancel_timer(progress)
        elif self.timer_deadline(progress) is None:
            self.set_timer(progress, now + self.spread_config.progress_interval_s)
        spread.finished = not pending
        if spread.finished and spread.origin:
            spread.origin = False  # report once, even if a block is handed to us again later
            self._on_completed(spread, now)

    def _send_ack(self, spread: SpreadState, address: Address, low: int, depth: int, done: bool) -> None:
        self.send(address, self._ack_message(spread.stream, spread.msg_id, low, depth, done))
        self._on_forward(spread, reliable_ack=True)

    # -- timers ----------------------------------------------------------------------------
    def _spread_timer(self, name: Hashable, now: float) -> bool:
        """Handle an engine timer; False when ``name`` is not one."""
        if not (isinstance(name, tuple) and name and name[0] == "spread"):
            return False
        kind, stream, msg_id = name[1], name[2], name[3]
        spread = self._spreads.get((stream, msg_id))
        if spread is None:
            return True
        if kind == "wait":
            self._delegate_failed(spread, (name[4], name[5]), now)
        elif kind == "progress":
            if spread.parents:
                for parent in spread.parents:
                    self._send_ack(spread, parent.address, parent.low, parent.depth, False)
                self.set_timer(name, now + self.spread_config.progress_interval_s)
        elif kind == "forget":
            self._forget(spread)
        return True

    def _delegate_failed(self, spread: SpreadState, block: Block, now: float) -> None:
        """A delegate did not accept, or fell silent: hand its block to another contact of it."""
        delegation = spread.delegations[block]
        self.suspicions.suspect(delegation.contact.node_id, now + self.spread_config.suspect_s, now)
        if len(delegation.tried) < self.spread_config.max_attempts and self._delegate_block(
                spread, delegation.low, delegation.depth, delegation.tried, now, proxies=delegation.proxies):
            self.spread_counters["redelegated"] += 1
            return
        delegation.done = True
        spread.unreached += 1
        self.spread_counters["given_up"] += 1
        self._check_finished(spread, now)

    def _suspected(self, node_id: int, now: float) -> bool:
        return self.suspicions.suspected(node_id, now)

    # -- memory ----------------------------------------------------------------------------
    def _remember(self, stream: int, msg_id: int, info: Any, reliable: bool, now: float) -> SpreadState:
        spread = SpreadState(stream, msg_id, info, reliable)
        self._spreads[(stream, msg_id)] = spread
        self.set_timer(("spread", "forget", stream, msg_id), now + self.spread_config.seen_ttl_s)
        return spread

    def _forget(self, spread: SpreadState) -> None:
        self._spreads.pop((spread.stream, spread.msg_id), None)
        self.cancel_timer(("spread", "progress", spread.stream, spread.msg_id))
        for low, depth in spread.delegations:
            self.cancel_timer(("spread", "wait", spread.stream, spread.msg_id, low, depth))

    def _seen(self, stream: int, msg_id: int) -> bool:
        return (stream, msg_id) in self._spreads


# -- the broadcast protocol -----------------------------------------------------------------

#: The engine's stream for broadcasts (a multicast stream is a group id).
BROADCAST_STREAM = -1


@dataclass(frozen=True, slots=True)
class _Payload:
    origin: int
    topic: str
    payload: bytes


class Broadcast(PrefixSpreader):
    """Broadcast to every node of the overlay; a layer above :class:`~p2pdeploy.overlay.kademlia.Kademlia`.

    ``broadcast(payload, now, topic=..., reliable=...)`` returns the broadcast id. Every other
    node emits :class:`BroadcastDelivered` once; in reliable mode the initiator emits
    :class:`BroadcastCompleted`. ``counters`` counts data messages and acknowledgements sent by
    this node, separately (``data_sent``, ``acks_sent``) and by mode.
    """

    handles = (BroadcastData, BroadcastAck)

    def __init__(self, overlay: Any, rng: Rng, config: SpreadConfig | None = None) -> None:
        super().__init__(overlay.node_id, rng, overlay.suspicions, config)
        self.overlay = overlay
        self.counters: dict[str, int] = {"data_sent": 0, "data_sent_reliable": 0, "acks_sent": 0,
                                         "delivered": 0, "duplicates": 0}

    # -- API -------------------------------------------------------------------------------
    def broadcast(self, payload: bytes, now: float, *, topic: str = "", reliable: bool = False) -> int:
        """Send ``payload`` to every node; the broadcast id (emits ``BroadcastCompleted`` if reliable)."""
        if not isinstance(payload, bytes):
            raise TypeError(f"a broadcast payload is bytes (got {type(payload).__name__})")
        if len(payload) > self.spread_config.max_payload_bytes:
            raise ValueError(f"broadcast payload of {len(payload)} bytes is over "
                             f"max_payload_bytes={self.spread_config.max_payload_bytes}")
        broadcast_id = self.rng.getrandbits(63)
        while self._seen(BROADCAST_STREAM, broadcast_id):
            broadcast_id = self.rng.getrandbits(63)
        self._spread_start(BROADCAST_STREAM, broadcast_id, _Payload(self.own_id, topic, payload), reliable, now)
        return broadcast_id

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        if type(msg) is BroadcastData:
            if self._seen(BROADCAST_STREAM, msg.broadcast_id):
                self.counters["duplicates"] += 1
            self._spread_receive(src, BROADCAST_STREAM, msg.broadcast_id, _Payload(msg.origin, msg.topic, msg.payload),
                                 msg.low, msg.depth, msg.hops, msg.reliable, now, proxies=msg.proxies)
        elif type(msg) is BroadcastAck:
            self._spread_ack(src, BROADCAST_STREAM, msg.broadcast_id, msg.low, msg.depth, msg.done, now)
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        self._spread_timer(name, now)

    # -- engine hooks ----------------------------------------------------------------------
    def _known(self, stream: int) -> Iterable[Contact]:
        for _, _, contacts in self.overlay.buckets():
            yield from reversed(contacts)  # a bucket lists its contacts least recently seen first

    def _closest(self, stream: int, target: int, count: int) -> list[Contact]:
        return self.overlay.closest_known(target, count)

    def _preferred(self, candidates: list[Contact]) -> list[Contact]:
        # The contacts heard from most recently are the likeliest to be up (Kademlia's own
        # observation); two of them, so load still spreads a little.
        return candidates[:2]

    def _data_message(self, spread: SpreadState, low: int, depth: int, hops: int, proxies: int) -> BroadcastData:
        p: _Payload = spread.info
        return BroadcastData(spread.msg_id, p.origin, self.own_id, low, depth, hops, spread.reliable, p.topic,
                             p.payload, proxies)

    def _ack_message(self, stream: int, msg_id: int, low: int, depth: int, done: bool) -> BroadcastAck:
        return BroadcastAck(msg_id, self.own_id, low, depth, done)

    def _on_delivered(self, spread: SpreadState, hops: int, now: float) -> None:
        p: _Payload = spread.info
        self.counters["delivered"] += 1
        self.emit(BroadcastDelivered(spread.msg_id, p.origin, p.topic, p.payload, hops))

    def _on_completed(self, spread: SpreadState, now: float) -> None:
        self.emit(BroadcastCompleted(spread.msg_id, spread.unreached))

    def _on_forward(self, spread: SpreadState, reliable_ack: bool = False) -> None:
        if reliable_ack:
            self.counters["acks_sent"] += 1
        elif spread.reliable:
            self.counters["data_sent_reliable"] += 1
        else:
            self.counters["data_sent"] += 1


__all__ = [
    "Broadcast",
    "BroadcastAck",
    "BroadcastCompleted",
    "BroadcastConfig",
    "BroadcastData",
    "BroadcastDelivered",
    "PrefixSpreader",
    "SpreadConfig",
    "SpreadState",
    "block_low",
    "group_by_sibling",
    "in_block",
    "sibling_depth",
    "sibling_low",
    "valid_block",
]
