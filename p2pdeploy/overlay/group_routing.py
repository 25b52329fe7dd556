"""Routing a multicast request hop by hop towards its group's root, for :mod:`p2pdeploy.overlay.multicast`.

A group's root is the live node closest to the group id, found the way Scribe (Castro et al.,
2002) finds it: each node hands the request to its next hop towards the id
(:func:`~p2pdeploy.overlay.routing.next_hop_towards` over the contacts Kademlia knows) until a
node knows nobody closer; that node is the root and handles the request. Every hop acknowledges
the request (``GroupRouteAck``); a hop that stays silent for ``hop_timeout_s`` is suspected for
``suspect_s`` (in the node's one list, :mod:`~p2pdeploy.overlay.suspicion`, which the other layers
and the failure detector share) and the request goes to the next closest contact instead, up to
``route_attempts`` hops. A root that yielded its group to a closer node sends the requests that
still reach it on to that node for a while (the redirect table).

The same hops carry Scribe's tree links (``attach``, ``detach``), which the node they are sent
to handles (:mod:`p2pdeploy.overlay.scribe`).

Not here: what the root does with a request (the member list, :mod:`p2pdeploy.overlay.group_root`;
Scribe's tree), and the protocol object that hosts this routing
(:class:`~p2pdeploy.overlay.multicast.Multicast`), whose sends, timers and counters it uses.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Address, Rng
from p2pdeploy.overlay.multicast_messages import GroupRoute, GroupRouteAck
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.overlay.routing import Contact, next_hop_towards

if TYPE_CHECKING:
    from p2pdeploy.overlay.multicast import Multicast, MulticastConfig

#: A routed request that has taken this many hops is looping (routing tables disagree); dropped.
MAX_HOPS = 64
#: Routed hops waiting for their ack at once; beyond it a request is dropped (``route_overload``).
MAX_HOPS_IN_FLIGHT = 4096
#: Routed request kinds: forwarded towards the root (``join``, ``leave``, ``locate``, ``publish``)
#: or handled by the node they are sent to (``attach``, ``detach``: Scribe's tree links).
ROUTED_KINDS = ("join", "leave", "locate", "publish")
LINK_KINDS = ("attach", "detach")


@dataclass(slots=True)
class _Hop:
    #: The request as sent, but for its ``hop_id`` (the tracker's id).
    msg: GroupRoute
    contact: Contact
    tried: list[int]


class GroupRouting:
    """This node's part in routing requests towards group roots, hosted by the
    :class:`~p2pdeploy.overlay.multicast.Multicast` layer: the routing sends, sets timers and
    counts dropped input through its ``host``, counts its hops in the shared ``counters``, and
    hands a request that reached the root to the host."""

    def __init__(self, host: Multicast, overlay: Any, rng: Rng, config: MulticastConfig, counters: dict[str, int],
                 max_hops_in_flight: int = MAX_HOPS_IN_FLIGHT) -> None:
        self.host = host
        self.overlay = overlay
        self.own_id: int = overlay.node_id
        self.config = config
        self.counters = counters
        #: The node's suspicions (the overlay's: one list for every layer, backed by its detector).
        self.suspicions = overlay.suspicions
        self.redirects: dict[int, tuple[Contact, float]] = {}  # group -> (the root we yielded to, until)
        #: Hops waiting for their ``GroupRouteAck``: the hop id is the request id.
        self.hops: RequestTracker[_Hop] = RequestTracker(
            host, "hop", rng=rng, limit=max_hops_in_flight, unexpected="unsolicited_ack", what="routed hops"
        )

    # -- the next hop ----------------------------------------------------------------------
    def next_hop(self, gid: int, now: float, exclude: Iterable[int] = ()) -> Contact | None:
        """The known contact closest to ``gid`` that is closer than this node and not suspected."""
        excluded = set(exclude)
        return next_hop_towards(self.own_id, gid, self.overlay.closest_known(gid, 2 * self.config.route_attempts + 4),
                                lambda node_id: node_id in excluded or self.suspicions.suspected(node_id, now))

    def route(self, gid: int, kind: str, request_id: int, requester: Contact, hops: int, payload: bytes,
              now: float, *, first: Contact | None = None, tried: list[int] | None = None,
              last_root: int | None = None) -> None:
        """Send a request one hop on towards the root of ``gid``, or handle it here if we are the root."""
        tried = tried or []
        if first is not None and first.node_id != self.own_id and not self.suspicions.suspected(first.node_id, now):
            hop: Contact | None = first
        else:
            hop = self.next_hop(gid, now, tried) or self._redirected(gid, now, tried)
        if hop is None:
            self.host._at_root(gid, kind, request_id, requester, payload, now, last_root)
            return
        self.send_hop(GroupRoute(0, self.own_id, gid, kind, requester, request_id, hops, payload, last_root),
                      hop, tried, now)

    def send_hop(self, template: GroupRoute, hop: Contact, tried: list[int], now: float) -> None:
        host = self.host
        if self.hops.full:
            host.dropped["route_overload"] += 1  # as lost: the join, locate or refresh timers retry
            if template.kind == "attach":
                host.scribe.attach_abandoned(template.group)
            return
        hop_id = self.hops.issue(_Hop(template, hop, [*tried, hop.node_id]), now, self.config.hop_timeout_s,
                                 address=hop.address, node_id=hop.node_id)
        msg = GroupRoute(hop_id, self.own_id, template.group, template.kind, template.requester,
                         template.request_id, template.hops, template.payload, template.last_root)
        host.send(hop.address, msg)
        self.counters["route_hops"] += 1
        if msg.kind == "publish":  # Scribe carries the message itself to the root
            self.counters["publish_hops"] += 1
            if msg.requester.node_id != self.own_id:
                host._count_forward(msg.group)

    # -- redirects from a root that yielded ------------------------------------------------
    def redirect(self, gid: int, closer: Contact, until: float) -> None:
        """A closer node is the root of ``gid`` now: requests that reach us go on to it until ``until``."""
        self.redirects[gid] = (closer, until)

    def forget_redirect(self, gid: int) -> None:
        self.redirects.pop(gid, None)

    def _redirected(self, gid: int, now: float, tried: list[int]) -> Contact | None:
        redirect = self.redirects.get(gid)
        if redirect is None:
            return None
        contact, expires = redirect
        if expires <= now or contact.node_id in tried or self.suspicions.suspected(contact.node_id, now):
            del self.redirects[gid]
            return None
        return contact

    # -- inputs ----------------------------------------------------------------------------
    def on_route(self, src: Address, msg: GroupRoute, now: float) -> None:
        host = self.host
        host.send(src, GroupRouteAck(msg.hop_id, self.own_id))
        if msg.kind in LINK_KINDS:
            host.scribe.on_link(src, msg, now)
            return
        if msg.kind not in ROUTED_KINDS:
            host.dropped["bad_route_kind"] += 1
            return
        if msg.hops >= MAX_HOPS:
            host.dropped["route_loop"] += 1
            return
        self.route(msg.group, msg.kind, msg.request_id, msg.requester, msg.hops + 1, msg.payload, now,
                   last_root=msg.last_root)

    def on_hop_ack(self, src: Address, msg: GroupRouteAck, now: float) -> None:
        request = self.hops.reply(msg.hop_id, src, msg.sender)
        if request is None:
            return
        hop = request.data
        if hop.msg.kind == "attach":
            self.host.scribe.attach_acked(hop.msg.group, hop.contact)

    def on_timer(self, name: Hashable, now: float) -> bool:
        """Handle the timer ``name`` if it is a hop's (True), else leave it to the host (False)."""
        if not self.hops.owns(name):
            return False
        self._hop_failed(name, now)
        return True

    def _hop_failed(self, timer_name: Hashable, now: float) -> None:
        request = self.hops.timed_out(timer_name)
        if request is None:
            return
        hop = request.data
        self.suspicions.suspect(hop.contact.node_id, now + self.config.suspect_s, now)
        msg = hop.msg
        scribe = self.host.scribe
        if len(hop.tried) >= self.config.route_attempts:
            self.host.dropped["route_failed"] += 1
            if msg.kind == "attach":
                scribe.attach_abandoned(msg.group)
            return
        if msg.kind == "attach":
            scribe.attach(msg.group, now, hop.tried)
        elif msg.kind == "detach":
            return
        else:
            self.route(msg.group, msg.kind, msg.request_id, msg.requester, msg.hops, msg.payload, now,
                       tried=hop.tried, last_root=msg.last_root)


__all__ = ["LINK_KINDS", "MAX_HOPS", "MAX_HOPS_IN_FLIGHT", "ROUTED_KINDS", "GroupRouting"]
