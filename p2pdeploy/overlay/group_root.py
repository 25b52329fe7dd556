"""The member list a group's root keeps, for the members tree of :mod:`p2pdeploy.overlay.multicast`.

The root of a group (the live node closest to its id, reached by
:mod:`p2pdeploy.overlay.group_routing`) keeps the member list as soft state, as Scribe's root
keeps its tree (Castro et al., 2002): members refresh their JOIN every ``refresh_interval_s``;
one not heard for ``member_ttl_s`` is dropped. The root copies the list to the next
``anchors - 1`` closest nodes (``AnchorSync``), which take over with it when the root fails
(they *adopt* the group). It hands every member a *view*: up to ``view_per_subtree`` members in
each sibling subtree of the member's id (the member set's own Kademlia table), in the reply to
its JOIN and again when the view changes (one round of ``GroupView`` per ``view_push_delay_s``).
A publisher outside the group asks the root (``locate``) for a few entry members.

A root that starts without a copy (all anchors failed) learns from the joins naming another
root that the list is being rebuilt: for one member TTL its views only add members, then a
complete round goes out. A closer node that appears takes the list over: the root sends it the
list and *yields*, redirecting the requests that still reach it; of two nodes acting as root,
the one closer to the group id keeps the role and both lists.

Not here: routing towards the root, the members' side (joins, refreshes, the views they hold)
and dissemination, which the :class:`~p2pdeploy.overlay.multicast.Multicast` layer that hosts
the lists does; its sends, timers and counters are the ones used here.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Address, Rng
from p2pdeploy.overlay.broadcast import group_by_sibling
from p2pdeploy.overlay.group_routing import GroupRouting
from p2pdeploy.overlay.multicast_messages import AnchorSync, GroupEntries, GroupView
from p2pdeploy.overlay.routing import Contact

if TYPE_CHECKING:
    from p2pdeploy.overlay.multicast import Multicast, MulticastConfig


@dataclass(slots=True)
class RootState:
    """The root's list for one group."""

    members: dict[int, tuple[Contact, float]]  # id -> (contact, expires at)
    version: int
    created_at: float
    #: True when this root started without a copy of the member list.
    cold: bool
    #: Views are complete from this time (a cold root that hears from members of an earlier
    #: root rebuilds the list for one member TTL).
    complete_at: float
    sent_views: dict[int, tuple[int, ...]] = field(default_factory=dict)


class GroupRoots:
    """The member lists of the groups this node is the root of, and the anchored copies it holds
    for roots nearby, hosted by the :class:`~p2pdeploy.overlay.multicast.Multicast` layer: the
    lists send, set timers (``("root", gid)``, ``("push", gid)``, ``("complete", gid)``) and
    answer this node's own requests through the ``host``, and count their work in the shared
    ``counters``."""

    def __init__(self, host: Multicast, overlay: Any, routing: GroupRouting, rng: Rng, config: MulticastConfig,
                 counters: dict[str, int]) -> None:
        self.host = host
        self.overlay = overlay
        self.own_id: int = overlay.node_id
        self.routing = routing
        self.rng = rng
        self.config = config
        self.counters = counters
        self.lists: dict[int, RootState] = {}
        self.anchored: dict[int, tuple[int, list[Contact], float]] = {}  # group -> (version, members, expires)

    # -- read-only views -------------------------------------------------------------------
    def holds(self, gid: int) -> bool:
        """This node is the root of ``gid`` (it keeps its member list)."""
        return gid in self.lists

    def member_count(self, gid: int) -> int | None:
        """Members on the list of ``gid`` (None on a node that is not its root)."""
        state = self.lists.get(gid)
        return None if state is None else len(state.members)

    # -- requests that reached the root ----------------------------------------------------
    def locate(self, gid: int, requester: Contact, now: float) -> None:
        """A publisher outside the group asks for entry members."""
        state = self.lists.get(gid) or self.adopt(gid, now, create=False)
        members = [c for c, _ in state.members.values() if c.node_id != requester.node_id] if state else []
        entries = self.rng.sample(members, min(self.config.entries, len(members)))
        self.reply(requester, GroupEntries(gid, self.own_id, entries), now)

    def leave(self, gid: int, requester: Contact, now: float) -> None:
        state = self.lists.get(gid) or self.adopt(gid, now, create=False)
        if state is None:
            return  # a leave for a group we know nothing about
        if state.members.pop(requester.node_id, None) is not None:
            state.sent_views.pop(requester.node_id, None)
            self.membership_changed(gid, now)

    def join(self, gid: int, requester: Contact, now: float, last_root: int | None) -> None:
        """A member joins or refreshes: it is on the list for a member TTL, and gets its view."""
        state = self.lists.get(gid) or self.adopt(gid, now, create=True)
        assert state is not None
        rejoin = last_root is not None and last_root != self.own_id
        if rejoin and state.cold and state.complete_at <= now < state.created_at + self.config.member_ttl_s:
            # Members of an earlier root are coming back and we started without its list: until
            # they all had time to refresh, views only add members, then a complete round goes out.
            state.complete_at = state.created_at + self.config.member_ttl_s
            self.host.set_timer(("complete", gid), state.complete_at)
        old = state.members.get(requester.node_id)
        state.members[requester.node_id] = (requester, now + self.config.member_ttl_s)
        if old is None or old[0] != requester:
            self.membership_changed(gid, now)
        view = self.view_for(state, requester.node_id)
        state.sent_views[requester.node_id] = tuple(c.node_id for c in view)
        self.reply(requester, GroupView(gid, self.own_id, state.version, view, now >= state.complete_at), now)

    def reply(self, requester: Contact, msg: Any, now: float) -> None:
        host = self.host
        if requester.node_id == self.own_id:
            host.receive(host.contact.address, msg, now)  # we asked ourselves: we are the root
        else:
            host.send(requester.address, msg)
        if type(msg) is GroupView:
            self.counters["views_sent"] += 1

    # -- the list --------------------------------------------------------------------------
    def adopt(self, gid: int, now: float, *, create: bool) -> RootState | None:
        """Become the root of ``gid``: with the anchored member list if we hold a fresh one."""
        anchored = self.anchored.pop(gid, None)
        if anchored is not None and anchored[2] > now:
            version, members, _ = anchored
            expires = now + self.config.member_ttl_s
            state = RootState({c.node_id: (c, expires) for c in members}, version + 1, now, False, now)
        elif create:
            state = RootState({}, 0, now, True, now)
        else:
            return None
        self.lists[gid] = state
        self.routing.forget_redirect(gid)
        self.host.set_timer(("root", gid), now + self.config.refresh_interval_s)
        return state

    def view_for(self, state: RootState, member_id: int) -> list[Contact]:
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

    def membership_changed(self, gid: int, now: float) -> None:
        state = self.lists[gid]
        state.version += 1
        if self.host.timer_deadline(("push", gid)) is None:
            self.host.set_timer(("push", gid), now + self.config.view_push_delay_s)

    def push_views(self, gid: int, now: float, *, everyone: bool = False) -> None:
        """Send each member whose view changed (``everyone``: each member) its view, and the list
        to the anchors."""
        state = self.lists.get(gid)
        if state is None:
            return
        complete = now >= state.complete_at
        for member_id, (contact, _) in state.members.items():
            view = self.view_for(state, member_id)
            ids = tuple(c.node_id for c in view)
            if everyone or state.sent_views.get(member_id) != ids:
                state.sent_views[member_id] = ids
                self.reply(contact, GroupView(gid, self.own_id, state.version, view, complete), now)
        self.sync_anchors(gid, state)

    # -- anchors ---------------------------------------------------------------------------
    def sync_anchors(self, gid: int, state: RootState) -> None:
        members = [c for c, _ in state.members.values()]
        for contact in self.overlay.closest_known(gid, self.config.anchors - 1):
            self.host.send(contact.address, AnchorSync(gid, self.own_id, state.version, members))
            self.counters["anchor_syncs"] += 1

    def on_anchor_sync(self, src: Address, msg: AnchorSync, now: float) -> None:
        gid = msg.group
        members = list(msg.members)
        state = self.lists.get(gid)
        if state is not None:
            # Two nodes act as root (their tables disagreed, or a closer node joined): the one
            # closer to the group id keeps the role and the union of both lists.
            self.counters["rival_roots"] += 1
            if msg.sender ^ gid > self.own_id ^ gid:
                expires = now + self.config.member_ttl_s
                for contact in members:
                    if contact.node_id not in state.members:
                        state.members[contact.node_id] = (contact, expires)
                self.membership_changed(gid, now)
                self.host.send(src, AnchorSync(gid, self.own_id, state.version,
                                               [c for c, _ in state.members.values()]))
                return
            known = {c.node_id: c for c, _ in state.members.values()}
            known.update((c.node_id, c) for c in members)
            members = list(known.values())
            self.yield_root(gid, Contact(msg.sender, src), now)
        self.anchored[gid] = (msg.version, members, now + 3 * self.config.refresh_interval_s)

    def yield_root(self, gid: int, closer: Contact, now: float) -> None:
        """A closer node is the root of ``gid`` now: requests that reach us go on to it."""
        self.lists.pop(gid, None)
        self.host.cancel_timer(("root", gid))
        self.host.cancel_timer(("push", gid))
        self.routing.redirect(gid, closer, now + 3 * self.config.refresh_interval_s)

    # -- timers ----------------------------------------------------------------------------
    def on_timer(self, name: Hashable, now: float) -> bool:
        """Handle the timer ``name`` if it is the lists' (True), else leave it to the host (False)."""
        if not isinstance(name, tuple) or len(name) != 2:
            return False
        kind, gid = name
        if kind == "root":
            self.tick(gid, now)
        elif kind == "push":
            self.push_views(gid, now)
        elif kind == "complete":
            self.push_views(gid, now, everyone=True)  # replaces the views members added up
        else:
            return False
        return True

    def tick(self, gid: int, now: float) -> None:
        """Expire silent members; hand the list over if a closer node appeared."""
        state = self.lists.get(gid)
        if state is None:
            return
        expired = [mid for mid, (_, expires) in state.members.items() if expires <= now]
        for member_id in expired:
            del state.members[member_id]
            state.sent_views.pop(member_id, None)
        closer = self.routing.next_hop(gid, now)
        if closer is not None:
            members = [c for c, _ in state.members.values()]
            self.host.send(closer.address, AnchorSync(gid, self.own_id, state.version, members))
            self.anchored[gid] = (state.version, members, now + 3 * self.config.refresh_interval_s)
            self.yield_root(gid, closer, now)
            return
        if not state.members:
            del self.lists[gid]
            return
        if expired:
            self.membership_changed(gid, now)
        else:
            self.sync_anchors(gid, state)
        self.host.set_timer(("root", gid), now + self.config.refresh_interval_s)


__all__ = ["GroupRoots", "RootState"]
