"""Scribe's multicast trees (Castro et al., 2002), one of the two trees of :mod:`p2pdeploy.overlay.multicast`.

A JOIN goes to the next hop towards the group id, which records the child and, if not yet in
the tree, joins its own next hop (``attach``); a node that knows nobody closer is the root.
Messages are routed to the root (``publish``) and flow down the tree. Links are soft state:
every node re-attaches each ``refresh_interval_s`` (the parent's ack confirms the link, silence
re-attaches elsewhere) and a parent drops a child not heard for a member TTL. Nodes on the join
paths forward group traffic without being members. Best effort only.

Not here: the routing of requests towards the root (hop acks, suspicion, retries), which
:class:`~p2pdeploy.overlay.group_routing.GroupRouting` does for both trees in the
:class:`~p2pdeploy.overlay.multicast.Multicast` layer that hosts them, and the members tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from p2pdeploy.core import Address
from p2pdeploy.overlay.multicast_messages import GroupData, GroupJoined, GroupRoute
from p2pdeploy.overlay.routing import Contact

if TYPE_CHECKING:
    from p2pdeploy.overlay.multicast import Multicast


@dataclass(slots=True)
class TreeNode:
    """Scribe: this node's links in a group's tree."""

    parent: Contact | None = None
    root: bool = False
    attaching: bool = False
    children: dict[int, tuple[Contact, float]] = field(default_factory=dict)


class ScribeTrees:
    """This node's links in the Scribe trees of the groups it is on, hosted by the
    :class:`~p2pdeploy.overlay.multicast.Multicast` layer: routing, timers, membership,
    delivery and duplicate detection are the host's, the tree links are these."""

    def __init__(self, host: Multicast) -> None:
        self.host = host
        self.nodes: dict[int, TreeNode] = {}

    # -- read-only views -------------------------------------------------------------------
    def holds(self, gid: int) -> bool:
        """This node is on the tree of ``gid`` (a member, or a forwarder on a join path)."""
        return gid in self.nodes

    def is_attached(self, gid: int) -> bool:
        node = self.nodes.get(gid)
        return node is not None and (node.root or node.parent is not None)

    def is_root(self, gid: int) -> bool:
        node = self.nodes.get(gid)
        return node is not None and node.root

    def children(self, gid: int) -> list[Contact]:
        node = self.nodes.get(gid)
        return [] if node is None else [c for c, _ in node.children.values()]

    # -- membership ------------------------------------------------------------------------
    def join(self, gid: int, now: float) -> None:
        self.nodes.setdefault(gid, TreeNode())
        self.ensure_attached(gid, now)

    def leave(self, gid: int, now: float) -> None:
        """A member left: a node with no children leaves the tree; one with children stays on as a forwarder."""
        node = self.nodes.get(gid)
        if node is not None and not node.children:
            self.detach(gid, now)

    # -- links -----------------------------------------------------------------------------
    def attach_acked(self, gid: int, parent: Contact) -> None:
        """The parent acknowledged our ``attach``: the link stands."""
        node = self.nodes.get(gid)
        if node is not None:
            node.attaching = False
            node.parent = parent
            node.root = False
            self.joined(gid, parent.node_id)

    def attach_abandoned(self, gid: int) -> None:
        node = self.nodes.get(gid)
        if node is not None:
            node.attaching = False  # the next refresh tries again

    def ensure_attached(self, gid: int, now: float) -> None:
        node = self.nodes[gid]
        if node.root or node.parent is not None or node.attaching:
            return
        self.attach(gid, now, [])

    def attach(self, gid: int, now: float, tried: list[int]) -> None:
        host = self.host
        node = self.nodes.get(gid)
        if node is None:
            return
        parent = host.routing.next_hop(gid, now, tried)
        if parent is None:
            node.root, node.parent, node.attaching = True, None, False
            self.joined(gid, host.own_id)
            return
        node.attaching = True
        host.routing.send_hop(GroupRoute(0, host.own_id, gid, "attach", host.contact, 0, 0), parent, tried, now)

    def joined(self, gid: int, parent_id: int) -> None:
        host = self.host
        membership = host._groups.get(gid)
        if membership is not None and not membership.joined:
            membership.joined = True
            host.emit(GroupJoined(membership.name, gid, parent_id, 0))

    def detach(self, gid: int, now: float) -> None:
        host = self.host
        node = self.nodes.pop(gid, None)
        host.cancel_timer(("refresh", gid))
        if node is not None and node.parent is not None:
            host.routing.send_hop(GroupRoute(0, host.own_id, gid, "detach", host.contact, 0, 0), node.parent, [], now)

    def on_link(self, src: Address, msg: GroupRoute, now: float) -> None:
        host = self.host
        if host.config.tree != "scribe":
            host.dropped["wrong_tree"] += 1
            return
        gid = msg.group
        if msg.kind == "detach":
            node = self.nodes.get(gid)
            if node is not None:
                node.children.pop(msg.sender, None)
            return
        node = self.nodes.get(gid)
        if node is None:
            node = self.nodes[gid] = TreeNode()
            host._arm_refresh(gid, now)
        node.children[msg.sender] = (Contact(msg.sender, src), now + host.config.member_ttl_s)
        self.ensure_attached(gid, now)

    def refresh(self, gid: int, now: float) -> None:
        host = self.host
        node = self.nodes.get(gid)
        if node is None:
            return
        for child_id in [cid for cid, (_, expires) in node.children.items() if expires <= now]:
            del node.children[child_id]
        if gid not in host._groups and not node.children:
            self.detach(gid, now)
            return
        if node.root:
            if host.routing.next_hop(gid, now) is not None:  # a closer node appeared: it is the root now
                node.root = False
                self.attach(gid, now, [])
        elif node.parent is not None:
            node.attaching = True  # the parent's ack confirms the link; silence re-attaches elsewhere
            host.routing.send_hop(GroupRoute(0, host.own_id, gid, "attach", host.contact, 0, 0), node.parent, [], now)
        elif not node.attaching:
            self.attach(gid, now, [])

    def publish(self, gid: int, msg_id: int, origin: int, payload: bytes, now: float) -> None:
        """At the root: pass the message down the tree."""
        host = self.host
        node = self.nodes.get(gid)
        if node is None:
            host.dropped["no_tree"] += 1
            return
        self.data(GroupData(gid, msg_id, origin, host.own_id, 0, 0, 0, False, payload), now)

    def data(self, msg: GroupData, now: float) -> None:
        host = self.host
        gid = msg.group
        key = (gid, msg.msg_id)
        spread = host._spreads.get(key)
        if spread is not None and spread.covered_depth == 0:
            host.counters["duplicates"] += 1
            return
        if spread is None:
            spread = host._remember(gid, msg.msg_id, None, False, now)
            spread.hops = msg.hops
        spread.covered_depth = 0  # passed down: a second copy is a duplicate
        membership = host._groups.get(gid)
        if membership is not None:
            host._deliver(membership, msg.msg_id, msg.origin, msg.payload, msg.hops, now)
        node = self.nodes.get(gid)
        if node is None:
            return
        for child, _ in node.children.values():
            host.send(child.address, GroupData(gid, msg.msg_id, msg.origin, host.own_id, 0, 0, msg.hops + 1,
                                               False, msg.payload))
            host.counters["data_sent"] += 1
            if msg.hops > 0 or msg.origin != host.own_id:  # not the root sending its own message
                host._count_forward(gid)


__all__ = ["ScribeTrees", "TreeNode"]
