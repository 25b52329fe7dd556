"""The messages (wire tags 62-68) and events of multicast groups (:mod:`p2pdeploy.overlay.multicast`).

One module for the wire vocabulary that the members tree, Scribe's tree
(:mod:`p2pdeploy.overlay.scribe`) and the routing towards a group's root share.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdeploy.overlay.routing import Contact
from p2pdeploy.wire import NodeId, message

# -- messages -------------------------------------------------------------------------------


@message(62)
class GroupRoute:
    """A request travelling hop by hop towards the root of ``group`` (see ``ROUTED_KINDS``), or a
    Scribe tree link (``LINK_KINDS``). ``hop_id`` is this hop's nonce, echoed by the ack."""

    hop_id: int
    sender: NodeId
    group: NodeId
    kind: str
    requester: Contact
    request_id: int
    hops: int
    payload: bytes = b""
    #: Join: the root whose view the member holds (a root that started without the member list
    #: learns from a join naming another root that the list is being rebuilt).
    last_root: NodeId | None = None


@message(63)
class GroupRouteAck:
    hop_id: int
    sender: NodeId


@message(64)
class GroupView:
    """The root tells a member whom to hand messages to. ``complete`` is false while a root
    that took over without the member list rebuilds it from the members' refreshes: the member
    then adds these to its view instead of replacing it, until a complete view comes."""

    group: NodeId
    sender: NodeId
    version: int
    view: list[Contact]
    complete: bool


@message(65)
class GroupEntries:
    """The root's answer to ``locate``: members a publisher outside the group may hand messages to."""

    group: NodeId
    sender: NodeId
    entries: list[Contact]


@message(66)
class GroupData:
    """A group message handed to a member with the block ``(low, depth)`` it now covers (members
    tree), or passed down a Scribe tree (block unused)."""

    group: NodeId
    msg_id: int
    origin: NodeId
    sender: NodeId
    low: NodeId
    depth: int
    hops: int
    reliable: bool
    payload: bytes
    #: Proxies the block passed through (0: the receiver lies in it).
    proxies: int = 0


@message(67)
class GroupDataAck:
    group: NodeId
    msg_id: int
    sender: NodeId
    low: NodeId
    depth: int
    done: bool


@message(68)
class AnchorSync:
    """The root's member list, copied to the next closest nodes so one of them can take over."""

    group: NodeId
    sender: NodeId
    version: int
    members: list[Contact]


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupJoined:
    """The root answered this member's first JOIN: messages now reach it (Scribe: the member is
    attached to the tree, and ``root`` is its parent)."""

    name: str
    group: int
    root: int
    view_size: int


@dataclass(frozen=True, slots=True)
class GroupDelivered:
    """A group message reached this member (once per message id)."""

    name: str
    group: int
    msg_id: int
    origin: int
    payload: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class GroupSendFinished:
    """A reliable send is done: every block was acknowledged, or ``unreached_blocks`` were given up
    (for a publisher outside the group, 1 means no entry member took the message)."""

    name: str
    group: int
    msg_id: int
    unreached_blocks: int


__all__ = [
    "AnchorSync",
    "GroupData",
    "GroupDataAck",
    "GroupDelivered",
    "GroupEntries",
    "GroupJoined",
    "GroupRoute",
    "GroupRouteAck",
    "GroupSendFinished",
    "GroupView",
]
