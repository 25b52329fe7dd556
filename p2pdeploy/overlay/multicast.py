"""Multicast groups anchored at the nodes closest to the group id, with member-only trees.

A group named ``G`` has the id ``key_id(G)``; its *root* is the live node closest to that id,
found the way Scribe (Castro et al., 2002) finds it: requests are routed hop by hop with
:meth:`~p2pdeploy.overlay.kademlia.Kademlia.next_hop_towards` until a node knows nobody closer.
Every hop acknowledges the request; a hop that stays silent for ``hop_timeout_s`` is suspected
for ``suspect_s`` (in the node's one list, :mod:`~p2pdeploy.overlay.suspicion`, which the other
layers and the failure detector share) and the request goes to the next closest contact instead.

Two ways to carry group traffic (``MulticastConfig.tree``):

- ``"members"`` (the default): the root keeps the member list (soft state: members refresh
  their JOIN every ``refresh_interval_s``; one not heard for ``member_ttl_s`` is dropped) and
  copies it to the next ``anchors - 1`` closest nodes, which take over with the list when the
  root fails. The root hands every member a *view*: up to ``view_per_subtree`` members in each
  sibling subtree of the member's id (the member set's own Kademlia table), in the reply to
  its JOIN and again when the view changes. A message then spreads over the members alone with
  the El-Ansary engine of :mod:`p2pdeploy.overlay.broadcast`: each member hands one member per
  non-empty sibling subtree the block it lies in, so it costs M-1 messages, is O(log M) deep,
  and bystanders carry none of it. A publisher outside the group asks the root (routed
  ``locate``) for a few entry members, keeps them as soft state and hands each message to one.
  The root is on no data path: it fails without losing a message, and members detect its
  failure when a refresh is not acknowledged and re-route the JOIN to the new closest node,
  which holds the anchored copy of the list. A root that starts without a copy (all anchors
  failed) learns from the joins naming another root that the list is being rebuilt: for one
  member TTL its views only add members, then a complete round goes out. A closer node that
  appears takes the list over (``AnchorSync``); of two nodes acting as root, the one closer to
  the group id keeps the role and both lists. A member that leaves keeps passing messages on
  (without delivering them) for a member TTL, since stale views and entry lists still name it.
- ``"scribe"``: Scribe's tree, for comparison (:mod:`p2pdeploy.overlay.scribe`). A JOIN goes to the next hop towards the group
  id, which records the child and, if not yet in the tree, joins its own next hop; messages are
  routed to the root and flow down the tree. Nodes on the join paths forward group traffic
  without being members. Best effort only.

Reliable sends (``send_to(..., reliable=True)``, members tree only) acknowledge every hand-off
and re-delegate a block whose member failed, as reliable broadcast does.

:class:`Multicast` is the protocol object a node's stack holds; it composes parts, one module each:

- :mod:`p2pdeploy.overlay.group_routing`: routing requests hop by hop towards a group's root
  (hop acks, suspicion, retries, redirects from a root that yielded), for both trees;
- :mod:`p2pdeploy.overlay.group_root`: the root's member list (soft state, views, anchors,
  adopting and yielding the role);
- :mod:`p2pdeploy.overlay.scribe`: Scribe's trees.

It keeps the members' side (join, refresh, the views they hold), publishers outside the group
(locate, entries, hand-off) and dissemination. The messages and events live in
:mod:`p2pdeploy.overlay.multicast_messages`; every one of them is importable from here.

Not here: content filtering, ordering and delivery guarantees, which :mod:`p2pdeploy.collective.pubsub`
builds on top, and any check of who may join or send (groups are open).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Rng, require_at_least, require_positive
from p2pdeploy.overlay import multicast_messages
from p2pdeploy.overlay.broadcast import PrefixSpreader, SpreadConfig, SpreadState
from p2pdeploy.overlay.group_root import GroupRoots
from p2pdeploy.overlay.group_routing import (
    LINK_KINDS,
    MAX_HOPS,
    MAX_HOPS_IN_FLIGHT,
    ROUTED_KINDS,
    GroupRouting,
)
from p2pdeploy.overlay.identity import key_id
from p2pdeploy.overlay.multicast_messages import (
    AnchorSync,
    GroupData,
    GroupDataAck,
    GroupDelivered,
    GroupEntries,
    GroupJoined,
    GroupRoute,
    GroupRouteAck,
    GroupSendFinished,
    GroupView,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.scribe import ScribeTrees

TREES = ("members", "scribe")

# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MulticastConfig:
    tree: str = "members"
    #: Members (and Scribe tree links) refresh this often; the soft state lives 2.5 periods.
    refresh_interval_s: float = 30.0
    #: Nodes that hold a group's member list: the root and the next ``anchors - 1`` closest.
    anchors: int = 3
    #: Members of each sibling subtree a member's view holds (the spare ones replace a failed one).
    view_per_subtree: int = 3
    #: Entry members a root hands to a publisher outside the group.
    entries: int = 3
    #: A hop that does not acknowledge a routed request within this is suspected.
    hop_timeout_s: float = 1.0
    #: Next hops tried per request and hop before it is dropped.
    route_attempts: int = 5
    #: A join or locate whose answer does not come within this is routed again.
    request_timeout_s: float = 5.0
    #: A suspected contact is avoided for this long.
    suspect_s: float = 60.0
    #: Membership changes within this window go out as one round of view updates (a new member
    #: gets its own view at once; the others hear of it this much later, plus a round trip).
    view_push_delay_s: float = 0.1
    spread: SpreadConfig = field(default_factory=SpreadConfig)

    def __post_init__(self) -> None:
        if self.tree not in TREES:
            raise ValueError(f"multicast.tree must be one of {', '.join(TREES)} (got {self.tree!r})")
        require_positive(self, "multicast.", "refresh_interval_s", "hop_timeout_s", "request_timeout_s", "suspect_s")
        require_at_least(self, "multicast.", 0, "view_push_delay_s")
        require_at_least(self, "multicast.", 1, "anchors", "view_per_subtree", "entries", "route_attempts")

    @property
    def member_ttl_s(self) -> float:
        return 2.5 * self.refresh_interval_s


def group_id(name: str) -> int:
    """The id of the group named ``name`` (its root is the node closest to it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a group name is a non-empty string (got {name!r})")
    return key_id(name.encode())


# -- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Membership:
    name: str
    group: int
    root: Contact | None = None
    view: list[Contact] = field(default_factory=list)
    view_from: tuple[int, int] = (-1, -1)  # (root id, version) of the view held
    joined: bool = False
    queued: list[_Queued] = field(default_factory=list)


@dataclass(slots=True)
class _Publisher:
    name: str
    entries: list[Contact] = field(default_factory=list)
    expires_at: float = 0.0
    locating: bool = False
    queued: list[_Queued] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Message:
    name: str
    origin: int
    payload: bytes
    #: A publisher outside the group retries once with fresh entries when all of them failed.
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class _Queued:
    msg_id: int
    payload: bytes
    reliable: bool
    attempt: int = 0


class Multicast(PrefixSpreader):
    """Multicast groups; a layer above :class:`~p2pdeploy.overlay.kademlia.Kademlia`.

    ``join(name, now)``, ``leave(name, now)`` and ``send_to(name, payload, now, reliable=False)``
    (members and outsiders alike). A member emits :class:`GroupJoined` once the root answered,
    then :class:`GroupDelivered` for each message (a layer above consumes those of its own
    groups); a reliable send emits :class:`GroupSendFinished` at its sender. ``address`` is this
    node's own address, which members advertise to the root.
    """

    handles = (GroupRoute, GroupRouteAck, GroupView, GroupEntries, GroupData, GroupDataAck, AnchorSync)

    def __init__(self, overlay: Any, rng: Rng, address: Address, config: MulticastConfig | None = None) -> None:
        self.config = config or MulticastConfig()
        super().__init__(overlay.node_id, rng, overlay.suspicions, self.config.spread)
        self.overlay = overlay
        self.contact = Contact(overlay.node_id, address)
        self._groups: dict[int, _Membership] = {}
        #: Groups left recently: (view, until). Stale views and entry lists elsewhere still name us
        #: for a while, so we keep passing messages on (without delivering them) until then.
        self._departed: dict[int, tuple[list[Contact], float]] = {}
        self._publishers: dict[int, _Publisher] = {}
        self.counters: dict[str, int] = {
            "data_originated": 0, "data_sent": 0, "forwards_member": 0, "forwards_nonmember": 0, "acks_sent": 0,
            "delivered": 0, "duplicates": 0, "route_hops": 0, "publish_hops": 0, "views_sent": 0,
            "anchor_syncs": 0, "rival_roots": 0,
        }
        #: Scribe's trees (``tree = "scribe"``): this node's links in each.
        self.scribe = ScribeTrees(self)
        #: Requests on their way to group roots (both trees), hop by hop.
        self.routing = GroupRouting(self, overlay, rng, self.config, self.counters, MAX_HOPS_IN_FLIGHT)
        #: The member lists of the groups this node is the root of (members tree).
        self.roots = GroupRoots(self, overlay, self.routing, rng, self.config, self.counters)

    # -- API -------------------------------------------------------------------------------
    def join(self, name: str, now: float) -> int:
        """Become a member of ``name`` (idempotent); the group id. Its messages are
        ``GroupDelivered`` events (which a layer above, such as pub/sub, may consume)."""
        gid = group_id(name)
        if gid in self._groups:
            return gid
        self._groups[gid] = _Membership(name, gid)
        self._departed.pop(gid, None)
        if self.config.tree == "scribe":
            self.scribe.join(gid, now)
        else:
            self._send_join(gid, now)
        self._arm_refresh(gid, now)
        return gid

    def leave(self, name: str, now: float) -> None:
        """Stop being a member of ``name`` (nothing happens if this node is not one)."""
        gid = group_id(name)
        membership = self._groups.pop(gid, None)
        if membership is None:
            return
        self.cancel_timer(("join_wait", gid))
        self._departed[gid] = (membership.view, now + self.config.member_ttl_s)
        if self.config.tree == "scribe":
            self.scribe.leave(gid, now)
            return
        self.cancel_timer(("refresh", gid))
        self.routing.route(gid, "leave", self.rng.getrandbits(63), self.contact, 0, b"", now, first=membership.root)

    def send_to(self, name: str, payload: bytes, now: float, *, reliable: bool = False) -> int:
        """Send ``payload`` to every member of ``name``; the message id."""
        if not isinstance(payload, bytes):
            raise TypeError(f"a group message is bytes (got {type(payload).__name__})")
        if len(payload) > self.spread_config.max_payload_bytes:
            raise ValueError(f"group message of {len(payload)} bytes is over "
                             f"max_payload_bytes={self.spread_config.max_payload_bytes}")
        if reliable and self.config.tree == "scribe":
            raise ValueError('reliable group messages need multicast.tree = "members" (Scribe trees are best effort)')
        gid = group_id(name)
        msg_id = self.rng.getrandbits(63)
        self.counters["data_originated"] += 1
        if self.config.tree == "scribe":
            self._remember(gid, msg_id, _Message(name, self.own_id, payload), False, now)
            self.routing.route(gid, "publish", msg_id, self.contact, 0, payload, now)
            return msg_id
        membership = self._groups.get(gid)
        if membership is not None:
            if membership.joined:
                self._spread_start(gid, msg_id, _Message(name, self.own_id, payload), reliable, now, deliver=True)
            else:
                membership.queued.append(_Queued(msg_id, payload, reliable))
            return msg_id
        self._publish_outside(gid, name, _Queued(msg_id, payload, reliable), now)
        return msg_id

    def _publish_outside(self, gid: int, name: str, queued: _Queued, now: float) -> None:
        publisher = self._publishers.setdefault(gid, _Publisher(name))
        if publisher.entries and publisher.expires_at > now:
            self._handoff(gid, publisher.name, queued, publisher.entries, now)
        else:
            publisher.queued.append(queued)
            self._locate(gid, now)

    # -- read-only views -------------------------------------------------------------------
    def is_member(self, name: str) -> bool:
        return group_id(name) in self._groups

    def is_joined(self, name: str) -> bool:
        """True once the root answered this member's JOIN (Scribe: once attached to the tree)."""
        gid = group_id(name)
        if self.config.tree == "scribe":
            return gid in self._groups and self.scribe.is_attached(gid)
        membership = self._groups.get(gid)
        return membership is not None and membership.joined

    def is_root(self, name: str) -> bool:
        gid = group_id(name)
        return self.roots.holds(gid) or self.scribe.is_root(gid)

    def member_count(self, name: str) -> int | None:
        """Members on the root's list (None on a node that is not the root)."""
        return self.roots.member_count(group_id(name))

    def view(self, name: str) -> list[Contact]:
        membership = self._groups.get(group_id(name))
        return [] if membership is None else list(membership.view)

    def children(self, name: str) -> list[Contact]:
        """Scribe: this node's children in the tree of ``name``."""
        return self.scribe.children(group_id(name))

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is GroupData:
            self._on_data(src, msg, now)
        elif kind is GroupDataAck:
            self._spread_ack(src, msg.group, msg.msg_id, msg.low, msg.depth, msg.done, now)
        elif kind is GroupRoute:
            self.routing.on_route(src, msg, now)
        elif kind is GroupRouteAck:
            self.routing.on_hop_ack(src, msg, now)
        elif kind is GroupView:
            self._on_view(src, msg, now)
        elif kind is GroupEntries:
            self._on_entries(src, msg, now)
        elif kind is AnchorSync:
            self.roots.on_anchor_sync(src, msg, now)
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if self._spread_timer(name, now) or self.routing.on_timer(name, now) or self.roots.on_timer(name, now):
            return
        assert isinstance(name, tuple)
        kind, key = name
        if kind == "refresh":
            self._refresh(key, now)
        elif kind == "join_wait":
            membership = self._groups.get(key)
            if membership is not None and self.config.tree == "members":
                membership.root = None  # no answer: find the root afresh
                self._send_join(key, now)
        elif kind == "locate_wait":
            self._locate_failed(key, now)

    # -- routing towards the root (group_routing) and the root's list (group_root) --------
    def _at_root(self, gid: int, kind: str, request_id: int, requester: Contact, payload: bytes, now: float,
                 last_root: int | None = None) -> None:
        """A routed request (``ROUTED_KINDS``) reached the root of ``gid``: this node."""
        if kind == "publish":
            self.scribe.publish(gid, request_id, requester.node_id, payload, now)
            return
        if self.config.tree == "scribe":
            self.dropped["wrong_tree"] += 1
            return
        if kind == "locate":
            self.roots.locate(gid, requester, now)
        elif kind == "leave":
            self.roots.leave(gid, requester, now)
        else:
            self.roots.join(gid, requester, now, last_root)

    # -- members ---------------------------------------------------------------------------
    def _arm_refresh(self, gid: int, now: float) -> None:
        interval = self.config.refresh_interval_s
        self.set_timer(("refresh", gid), now + interval * self.rng.uniform(0.9, 1.1))

    def _send_join(self, gid: int, now: float) -> None:
        membership = self._groups[gid]
        self.set_timer(("join_wait", gid), now + self.config.request_timeout_s)  # the answer cancels it
        self.routing.route(gid, "join", self.rng.getrandbits(63), self.contact, 0, b"", now, first=membership.root,
                    last_root=membership.view_from[0] if membership.view_from[0] >= 0 else None)

    def _refresh(self, gid: int, now: float) -> None:
        if gid not in self._groups and not self.scribe.holds(gid):
            return
        if self.config.tree == "scribe":
            self.scribe.refresh(gid, now)
        else:
            self._send_join(gid, now)
        self._arm_refresh(gid, now)

    def _on_view(self, src: Address, msg: GroupView, now: float) -> None:
        membership = self._groups.get(msg.group)
        if membership is None:
            self.dropped["view_not_member"] += 1
            return
        if membership.view_from[0] == msg.sender and msg.version < membership.view_from[1]:
            return  # an older view from the same root overtaken by a newer one
        self.cancel_timer(("join_wait", msg.group))
        membership.root = Contact(msg.sender, src) if msg.sender != self.own_id else self.contact
        view = [c for c in msg.view if c.node_id != self.own_id]
        if not msg.complete:
            known = {c.node_id: c for c in membership.view}
            known.update((c.node_id, c) for c in view)
            view = list(known.values())
        membership.view = view
        membership.view_from = (msg.sender, msg.version)
        if not membership.joined:
            membership.joined = True
            self.emit(GroupJoined(membership.name, msg.group, msg.sender, len(view)))
            queued, membership.queued = membership.queued, []
            for q in queued:
                self._spread_start(msg.group, q.msg_id, _Message(membership.name, self.own_id, q.payload),
                                   q.reliable, now, deliver=True)

    # -- publishers outside the group ------------------------------------------------------
    def _locate(self, gid: int, now: float) -> None:
        publisher = self._publishers[gid]
        if publisher.locating:
            return
        publisher.locating = True
        self.set_timer(("locate_wait", gid), now + self.config.request_timeout_s)
        self.routing.route(gid, "locate", self.rng.getrandbits(63), self.contact, 0, b"", now)

    def _on_entries(self, src: Address, msg: GroupEntries, now: float) -> None:
        publisher = self._publishers.get(msg.group)
        if publisher is None or not publisher.locating:
            self.dropped["unsolicited_entries"] += 1
            return
        self.cancel_timer(("locate_wait", msg.group))
        publisher.locating = False
        publisher.entries = [c for c in msg.entries if c.node_id != self.own_id]
        publisher.expires_at = now + self.config.refresh_interval_s
        queued, publisher.queued = publisher.queued, []
        for q in queued:
            self._handoff(msg.group, publisher.name, q, publisher.entries, now)

    def _locate_failed(self, gid: int, now: float) -> None:
        publisher = self._publishers.get(gid)
        if publisher is None:
            return
        publisher.locating = False
        queued, publisher.queued = publisher.queued, []
        for q in queued:
            self.dropped["locate_failed"] += 1
            if q.reliable:
                self.emit(GroupSendFinished(publisher.name, gid, q.msg_id, 1))

    def _handoff(self, gid: int, name: str, queued: _Queued, entries: list[Contact], now: float) -> None:
        if not entries:
            self.dropped["empty_group"] += 1
            if queued.reliable:
                self.emit(GroupSendFinished(name, gid, queued.msg_id, 1))
            return
        info = _Message(name, self.own_id, queued.payload, queued.attempt)
        self._spread_handoff(gid, queued.msg_id, info, queued.reliable, entries, now)

    # -- dissemination (engine hooks) ------------------------------------------------------
    def _on_data(self, src: Address, msg: GroupData, now: float) -> None:
        if self.config.tree == "scribe":
            self.scribe.data(msg, now)
            return
        membership = self._groups.get(msg.group)
        if membership is None and not self._forwards_for(msg.group, now):
            self.dropped["data_not_member"] += 1
            return
        if self._seen(msg.group, msg.msg_id):
            self.counters["duplicates"] += 1
        info = _Message(membership.name if membership else "", msg.origin, msg.payload)
        self._spread_receive(src, msg.group, msg.msg_id, info, msg.low, msg.depth, msg.hops, msg.reliable, now,
                             proxies=msg.proxies)

    def _forwards_for(self, gid: int, now: float) -> bool:
        departed = self._departed.get(gid)
        if departed is None:
            return False
        if departed[1] <= now:
            del self._departed[gid]
            return False
        return True

    def _known(self, stream: int) -> Iterable[Contact]:
        membership = self._groups.get(stream)
        if membership is not None:
            return membership.view
        departed = self._departed.get(stream)
        return () if departed is None else departed[0]

    def _data_message(self, spread: SpreadState, low: int, depth: int, hops: int, proxies: int) -> GroupData:
        m: _Message = spread.info
        return GroupData(spread.stream, spread.msg_id, m.origin, self.own_id, low, depth, hops, spread.reliable,
                         m.payload, proxies)

    def _ack_message(self, stream: int, msg_id: int, low: int, depth: int, done: bool) -> GroupDataAck:
        return GroupDataAck(stream, msg_id, self.own_id, low, depth, done)

    def _on_delivered(self, spread: SpreadState, hops: int, now: float) -> None:
        m: _Message = spread.info
        membership = self._groups.get(spread.stream)
        if membership is None:
            return
        self._deliver(membership, spread.msg_id, m.origin, m.payload, hops, now)

    def _deliver(self, membership: _Membership, msg_id: int, origin: int, payload: bytes, hops: int,
                 now: float) -> None:
        self.counters["delivered"] += 1
        self.emit(GroupDelivered(membership.name, membership.group, msg_id, origin, payload, hops))

    def _on_completed(self, spread: SpreadState, now: float) -> None:
        m: _Message = spread.info
        if spread.handoff is not None and spread.unreached:
            publisher = self._publishers.get(spread.stream)
            if publisher is not None:
                publisher.entries, publisher.expires_at = [], 0.0  # they failed: locate afresh
                if m.attempt == 0:
                    self._forget(spread)
                    self._publish_outside(spread.stream, m.name, _Queued(spread.msg_id, m.payload, True, 1), now)
                    return
        self.emit(GroupSendFinished(m.name, spread.stream, spread.msg_id, spread.unreached))

    def _on_forward(self, spread: SpreadState, reliable_ack: bool = False) -> None:
        if reliable_ack:
            self.counters["acks_sent"] += 1
            return
        self.counters["data_sent"] += 1
        if spread.hops > 0:  # the origin's own sends are not forwards
            self._count_forward(spread.stream)

    def _count_forward(self, gid: int) -> None:
        if gid in self._groups:
            self.counters["forwards_member"] += 1
        else:
            self.counters["forwards_nonmember"] += 1


#: The layer's own names, and the messages and events it re-exports.
__all__ = ["Multicast", "MulticastConfig", "group_id", "TREES"]
__all__ += ["LINK_KINDS", "MAX_HOPS", "MAX_HOPS_IN_FLIGHT", "ROUTED_KINDS"]  # the routing's, see group_routing
__all__ += multicast_messages.__all__
