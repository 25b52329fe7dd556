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

The messages and events live in :mod:`p2pdeploy.overlay.multicast_messages`; every one of them
is importable from here.

Not here: content filtering, ordering and delivery guarantees, which :mod:`p2pdeploy.collective.pubsub`
builds on top, and any check of who may join or send (groups are open).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Rng, require_at_least, require_positive
from p2pdeploy.overlay import multicast_messages
from p2pdeploy.overlay.broadcast import PrefixSpreader, SpreadConfig, SpreadState, group_by_sibling
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
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.overlay.routing import Contact, next_hop_towards
from p2pdeploy.overlay.scribe import ScribeTrees

TREES = ("members", "scribe")
#: A routed request that has taken this many hops is looping (routing tables disagree); dropped.
MAX_HOPS = 64
#: Routed hops waiting for their ack at once; beyond it a request is dropped (``route_overload``).
MAX_HOPS_IN_FLIGHT = 4096
#: Routed request kinds: forwarded towards the root (``join``, ``leave``, ``locate``, ``publish``)
#: or handled by the node they are sent to (``attach``, ``detach``: Scribe's tree links).
ROUTED_KINDS = ("join", "leave", "locate", "publish")
LINK_KINDS = ("attach", "detach")


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
class _RootState:
    members: dict[int, tuple[Contact, float]]  # id -> (contact, expires at)
    version: int
    created_at: float
    #: True when this root started without a copy of the member list.
    cold: bool
    #: Views are complete from this time (a cold root that hears from members of an earlier
    #: root rebuilds the list for one member TTL).
    complete_at: float
    sent_views: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class _Publisher:
    name: str
    entries: list[Contact] = field(default_factory=list)
    expires_at: float = 0.0
    locating: bool = False
    queued: list[_Queued] = field(default_factory=list)


@dataclass(slots=True)
class _Hop:
    #: The request as sent, but for its ``hop_id`` (the tracker's id).
    msg: GroupRoute
    contact: Contact
    tried: list[int]


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
        self._roots: dict[int, _RootState] = {}
        self._anchored: dict[int, tuple[int, list[Contact], float]] = {}  # group -> (version, members, expires)
        self._publishers: dict[int, _Publisher] = {}
        #: Scribe's trees (``tree = "scribe"``): this node's links in each.
        self._scribe = ScribeTrees(self)
        self._redirects: dict[int, tuple[Contact, float]] = {}  # group -> (the root we yielded to, until)
        #: Hops waiting for their ``GroupRouteAck``: the hop id is the request id.
        self._hops: RequestTracker[_Hop] = RequestTracker(
            self, "hop", rng=rng, limit=MAX_HOPS_IN_FLIGHT, unexpected="unsolicited_ack", what="routed hops"
        )
        self.counters: dict[str, int] = {
            "data_originated": 0, "data_sent": 0, "forwards_member": 0, "forwards_nonmember": 0, "acks_sent": 0,
            "delivered": 0, "duplicates": 0, "route_hops": 0, "publish_hops": 0, "views_sent": 0,
            "anchor_syncs": 0, "rival_roots": 0,
        }

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
            self._scribe.join(gid, now)
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
            self._scribe.leave(gid, now)
            return
        self.cancel_timer(("refresh", gid))
        self._route(gid, "leave", self.rng.getrandbits(63), self.contact, 0, b"", now, first=membership.root)

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
            self._route(gid, "publish", msg_id, self.contact, 0, payload, now)
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
            return gid in self._groups and self._scribe.is_attached(gid)
        membership = self._groups.get(gid)
        return membership is not None and membership.joined

    def is_root(self, name: str) -> bool:
        gid = group_id(name)
        return gid in self._roots or self._scribe.is_root(gid)

    def member_count(self, name: str) -> int | None:
        """Members on the root's list (None on a node that is not the root)."""
        state = self._roots.get(group_id(name))
        return None if state is None else len(state.members)

    def view(self, name: str) -> list[Contact]:
        membership = self._groups.get(group_id(name))
        return [] if membership is None else list(membership.view)

    def children(self, name: str) -> list[Contact]:
        """Scribe: this node's children in the tree of ``name``."""
        return self._scribe.children(group_id(name))

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is GroupData:
            self._on_data(src, msg, now)
        elif kind is GroupDataAck:
            self._spread_ack(src, msg.group, msg.msg_id, msg.low, msg.depth, msg.done, now)
        elif kind is GroupRoute:
            self._on_route(src, msg, now)
        elif kind is GroupRouteAck:
            self._on_hop_ack(src, msg, now)
        elif kind is GroupView:
            self._on_view(src, msg, now)
        elif kind is GroupEntries:
            self._on_entries(src, msg, now)
        elif kind is AnchorSync:
            self._on_anchor_sync(src, msg, now)
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if self._spread_timer(name, now):
            return
        if self._hops.owns(name):
            self._hop_failed(name, now)
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
        elif kind == "root":
            self._root_tick(key, now)
        elif kind == "push":
            self._push_views(key, now)
        elif kind == "complete":
            self._push_views(key, now, everyone=True)  # replaces the views members added up

    # -- routing towards the root ----------------------------------------------------------
    def _next_hop(self, gid: int, now: float, exclude: Iterable[int] = ()) -> Contact | None:
        """The known contact closest to ``gid`` that is closer than this node and not suspected."""
        excluded = set(exclude)
        return next_hop_towards(self.own_id, gid, self.overlay.closest_known(gid, 2 * self.config.route_attempts + 4),
                                lambda node_id: node_id in excluded or self._suspected(node_id, now))

    def _route(self, gid: int, kind: str, request_id: int, requester: Contact, hops: int, payload: bytes,
               now: float, *, first: Contact | None = None, tried: list[int] | None = None,
               last_root: int | None = None) -> None:
        """Send a request one hop on towards the root of ``gid``, or handle it here if we are the root."""
        tried = tried or []
        if first is not None and first.node_id != self.own_id and not self._suspected(first.node_id, now):
            hop: Contact | None = first
        else:
            hop = self._next_hop(gid, now, tried) or self._redirected(gid, now, tried)
        if hop is None:
            self._at_root(gid, kind, request_id, requester, payload, now, last_root)
            return
        self._send_hop(GroupRoute(0, self.own_id, gid, kind, requester, request_id, hops, payload, last_root),
                       hop, tried, now)

    def _send_hop(self, template: GroupRoute, hop: Contact, tried: list[int], now: float) -> None:
        if self._hops.full:
            self.dropped["route_overload"] += 1  # as lost: the join, locate or refresh timers retry
            if template.kind == "attach":
                self._scribe.attach_abandoned(template.group)
            return
        hop_id = self._hops.issue(_Hop(template, hop, [*tried, hop.node_id]), now, self.config.hop_timeout_s,
                                  address=hop.address, node_id=hop.node_id)
        msg = GroupRoute(hop_id, self.own_id, template.group, template.kind, template.requester,
                         template.request_id, template.hops, template.payload, template.last_root)
        self.send(hop.address, msg)
        self.counters["route_hops"] += 1
        if msg.kind == "publish":  # Scribe carries the message itself to the root
            self.counters["publish_hops"] += 1
            if msg.requester.node_id != self.own_id:
                self._count_forward(msg.group)

    def _on_hop_ack(self, src: Address, msg: GroupRouteAck, now: float) -> None:
        request = self._hops.reply(msg.hop_id, src, msg.sender)
        if request is None:
            return
        hop = request.data
        if hop.msg.kind == "attach":
            self._scribe.attach_acked(hop.msg.group, hop.contact)

    def _hop_failed(self, timer_name: Hashable, now: float) -> None:
        request = self._hops.timed_out(timer_name)
        if request is None:
            return
        hop = request.data
        self.suspicions.suspect(hop.contact.node_id, now + self.config.suspect_s, now)
        msg = hop.msg
        if len(hop.tried) >= self.config.route_attempts:
            self.dropped["route_failed"] += 1
            if msg.kind == "attach":
                self._scribe.attach_abandoned(msg.group)
            return
        if msg.kind == "attach":
            self._scribe.attach(msg.group, now, hop.tried)
        elif msg.kind == "detach":
            return
        else:
            self._route(msg.group, msg.kind, msg.request_id, msg.requester, msg.hops, msg.payload, now,
                        tried=hop.tried, last_root=msg.last_root)

    def _on_route(self, src: Address, msg: GroupRoute, now: float) -> None:
        self.send(src, GroupRouteAck(msg.hop_id, self.own_id))
        if msg.kind in LINK_KINDS:
            self._scribe.on_link(src, msg, now)
            return
        if msg.kind not in ROUTED_KINDS:
            self.dropped["bad_route_kind"] += 1
            return
        if msg.hops >= MAX_HOPS:
            self.dropped["route_loop"] += 1
            return
        self._route(msg.group, msg.kind, msg.request_id, msg.requester, msg.hops + 1, msg.payload, now,
                    last_root=msg.last_root)

    # -- the root --------------------------------------------------------------------------
    def _at_root(self, gid: int, kind: str, request_id: int, requester: Contact, payload: bytes, now: float,
                 last_root: int | None = None) -> None:
        if kind == "publish":
            self._scribe.publish(gid, request_id, requester.node_id, payload, now)
            return
        if self.config.tree == "scribe":
            self.dropped["wrong_tree"] += 1
            return
        if kind == "locate":
            state = self._roots.get(gid) or self._adopt(gid, now, create=False)
            members = [c for c, _ in state.members.values() if c.node_id != requester.node_id] if state else []
            entries = self.rng.sample(members, min(self.config.entries, len(members)))
            self._reply(requester, GroupEntries(gid, self.own_id, entries), now)
            return
        state = self._roots.get(gid) or self._adopt(gid, now, create=kind == "join")
        if state is None:
            return  # a leave for a group we know nothing about
        if kind == "leave":
            if state.members.pop(requester.node_id, None) is not None:
                state.sent_views.pop(requester.node_id, None)
                self._membership_changed(gid, now)
            return
        rejoin = last_root is not None and last_root != self.own_id
        if rejoin and state.cold and state.complete_at <= now < state.created_at + self.config.member_ttl_s:
            # Members of an earlier root are coming back and we started without its list: until
            # they all had time to refresh, views only add members, then a complete round goes out.
            state.complete_at = state.created_at + self.config.member_ttl_s
            self.set_timer(("complete", gid), state.complete_at)
        old = state.members.get(requester.node_id)
        state.members[requester.node_id] = (requester, now + self.config.member_ttl_s)
        if old is None or old[0] != requester:
            self._membership_changed(gid, now)
        view = self._view_for(state, requester.node_id)
        state.sent_views[requester.node_id] = tuple(c.node_id for c in view)
        self._reply(requester, GroupView(gid, self.own_id, state.version, view, now >= state.complete_at), now)

    def _reply(self, requester: Contact, msg: Any, now: float) -> None:
        if requester.node_id == self.own_id:
            self.receive(self.contact.address, msg, now)  # we asked ourselves: we are the root
        else:
            self.send(requester.address, msg)
        if type(msg) is GroupView:
            self.counters["views_sent"] += 1

    def _adopt(self, gid: int, now: float, *, create: bool) -> _RootState | None:
        """Become the root of ``gid``: with the anchored member list if we hold a fresh one."""
        anchored = self._anchored.pop(gid, None)
        if anchored is not None and anchored[2] > now:
            version, members, _ = anchored
            expires = now + self.config.member_ttl_s
            state = _RootState({c.node_id: (c, expires) for c in members}, version + 1, now, False, now)
        elif create:
            state = _RootState({}, 0, now, True, now)
        else:
            return None
        self._roots[gid] = state
        self._redirects.pop(gid, None)
        self.set_timer(("root", gid), now + self.config.refresh_interval_s)
        return state

    def _view_for(self, state: _RootState, member_id: int) -> list[Contact]:
        """Up to ``view_per_subtree`` members in each sibling subtree of ``member_id``, closest first."""
        r = self.config.view_per_subtree
        view: list[Contact] = []
        groups = group_by_sibling(member_id, (c for c, _ in state.members.values()))
        for depth in sorted(groups):
            contacts = groups[depth]
            if len(contacts) > r:
                contacts = sorted(contacts, key=lambda c: c.node_id ^ member_id)[:r]
            view.extend(contacts)
        return view

    def _membership_changed(self, gid: int, now: float) -> None:
        state = self._roots[gid]
        state.version += 1
        if self.timer_deadline(("push", gid)) is None:
            self.set_timer(("push", gid), now + self.config.view_push_delay_s)

    def _push_views(self, gid: int, now: float, *, everyone: bool = False) -> None:
        """Send each member whose view changed (``everyone``: each member) its view, and the list
        to the anchors."""
        state = self._roots.get(gid)
        if state is None:
            return
        complete = now >= state.complete_at
        for member_id, (contact, _) in state.members.items():
            view = self._view_for(state, member_id)
            ids = tuple(c.node_id for c in view)
            if everyone or state.sent_views.get(member_id) != ids:
                state.sent_views[member_id] = ids
                self._reply(contact, GroupView(gid, self.own_id, state.version, view, complete), now)
        self._sync_anchors(gid, state)

    def _sync_anchors(self, gid: int, state: _RootState) -> None:
        members = [c for c, _ in state.members.values()]
        for contact in self.overlay.closest_known(gid, self.config.anchors - 1):
            self.send(contact.address, AnchorSync(gid, self.own_id, state.version, members))
            self.counters["anchor_syncs"] += 1

    def _on_anchor_sync(self, src: Address, msg: AnchorSync, now: float) -> None:
        gid = msg.group
        members = list(msg.members)
        state = self._roots.get(gid)
        if state is not None:
            # Two nodes act as root (their tables disagreed, or a closer node joined): the one
            # closer to the group id keeps the role and the union of both lists.
            self.counters["rival_roots"] += 1
            if msg.sender ^ gid > self.own_id ^ gid:
                expires = now + self.config.member_ttl_s
                for contact in members:
                    if contact.node_id not in state.members:
                        state.members[contact.node_id] = (contact, expires)
                self._membership_changed(gid, now)
                self.send(src, AnchorSync(gid, self.own_id, state.version, [c for c, _ in state.members.values()]))
                return
            known = {c.node_id: c for c, _ in state.members.values()}
            known.update((c.node_id, c) for c in members)
            members = list(known.values())
            self._yield_root(gid, Contact(msg.sender, src), now)
        self._anchored[gid] = (msg.version, members, now + 3 * self.config.refresh_interval_s)

    def _yield_root(self, gid: int, closer: Contact, now: float) -> None:
        """A closer node is the root of ``gid`` now: requests that reach us go on to it."""
        self._roots.pop(gid, None)
        self.cancel_timer(("root", gid))
        self.cancel_timer(("push", gid))
        self._redirects[gid] = (closer, now + 3 * self.config.refresh_interval_s)

    def _redirected(self, gid: int, now: float, tried: list[int]) -> Contact | None:
        redirect = self._redirects.get(gid)
        if redirect is None:
            return None
        contact, expires = redirect
        if expires <= now or contact.node_id in tried or self._suspected(contact.node_id, now):
            del self._redirects[gid]
            return None
        return contact

    def _root_tick(self, gid: int, now: float) -> None:
        """Expire silent members; hand the list over if a closer node appeared."""
        state = self._roots.get(gid)
        if state is None:
            return
        expired = [mid for mid, (_, expires) in state.members.items() if expires <= now]
        for member_id in expired:
            del state.members[member_id]
            state.sent_views.pop(member_id, None)
        closer = self._next_hop(gid, now)
        if closer is not None:
            members = [c for c, _ in state.members.values()]
            self.send(closer.address, AnchorSync(gid, self.own_id, state.version, members))
            self._anchored[gid] = (state.version, members, now + 3 * self.config.refresh_interval_s)
            self._yield_root(gid, closer, now)
            return
        if not state.members:
            del self._roots[gid]
            return
        if expired:
            self._membership_changed(gid, now)
        else:
            self._sync_anchors(gid, state)
        self.set_timer(("root", gid), now + self.config.refresh_interval_s)

    # -- members ---------------------------------------------------------------------------
    def _arm_refresh(self, gid: int, now: float) -> None:
        interval = self.config.refresh_interval_s
        self.set_timer(("refresh", gid), now + interval * self.rng.uniform(0.9, 1.1))

    def _send_join(self, gid: int, now: float) -> None:
        membership = self._groups[gid]
        self.set_timer(("join_wait", gid), now + self.config.request_timeout_s)  # the answer cancels it
        self._route(gid, "join", self.rng.getrandbits(63), self.contact, 0, b"", now, first=membership.root,
                    last_root=membership.view_from[0] if membership.view_from[0] >= 0 else None)

    def _refresh(self, gid: int, now: float) -> None:
        if gid not in self._groups and not self._scribe.holds(gid):
            return
        if self.config.tree == "scribe":
            self._scribe.refresh(gid, now)
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
        self._route(gid, "locate", self.rng.getrandbits(63), self.contact, 0, b"", now)

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
            self._scribe.data(msg, now)
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
__all__ = ["Multicast", "MulticastConfig", "group_id"]
__all__ += multicast_messages.__all__
