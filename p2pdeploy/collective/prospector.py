"""The resource prospector: an aggregation tree over the overlay, and queries that descend it.

SDIMS and Willow's tree, and Cone's descent: every node pushes to its parent (its next hop
towards the tree's key) the summary of its subtree, so the root holds COUNT, SUM, MIN, MAX,
value counts and TOP-K over the whole community, and a prospect for nodes that satisfy a
requirement descends from the root into the subtrees whose summaries may hold a match.

:class:`Prospector` is the protocol object a node's stack holds; it composes two parts, one
module each:

- :mod:`p2pdeploy.collective.aggregation_tree`: the tree (parents, children, updates, acks,
  detaches, orphans, expiry, the root), its messages (wire tags 80-82, 87);
- :mod:`p2pdeploy.collective.prospector_queries`: ``prospect`` and ``aggregate``, asked and
  answered over the tree, their messages (83-86) and events, and the spread of what they return.

Both read one :class:`~p2pdeploy.collective.prospector_config.ProspectorConfig`. Every public
name of the parts is importable from here.

Not here: what the attributes are (the resource layer describes nodes, see
:func:`p2pdeploy.resource.description.node_attributes`), and placement decisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from typing import Any

from p2pdeploy.collective.aggregation import Summary
from p2pdeploy.collective.aggregation_tree import (
    TREE_MESSAGES,
    AggregateAck,
    AggregateUpdate,
    AggregationTree,
    Detach,
    Orphaned,
)
from p2pdeploy.collective.prospector_config import ProspectorConfig
from p2pdeploy.collective.prospector_queries import (
    FUNCTIONS,
    MAX_RPCS,
    QUERY_MESSAGES,
    AggregateFinished,
    AggregateReply,
    AggregateRequest,
    Candidate,
    FoundNode,
    ProspectFinished,
    ProspectorQueries,
    ProspectReply,
    ProspectRequest,
    Subtree,
    next_for_spread,
    spread_pick,
)
from p2pdeploy.core import Address, Protocol, Rng
from p2pdeploy.overlay.kademlia import Kademlia, LookupFinished
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.description import DescriptionChanged
from p2pdeploy.resource.requirements import Requirement

MESSAGES = TREE_MESSAGES + QUERY_MESSAGES


def _from_tree(name: str, doc: str) -> Any:
    """A read-only attribute of the Prospector that is its tree's."""
    return property(lambda self: getattr(self.tree, name), doc=doc)


class Prospector(Protocol):
    """One node's part of the aggregation tree (:attr:`tree`) and of the prospect and aggregate
    queries (:attr:`queries`), which read the tree; both send, emit and set timers through this
    object, and count their work in :attr:`counters`."""

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
        self.counters: Counter[str] = Counter()
        self.tree = AggregationTree(self, overlay, self.contact, rng, self.config, self.counters, attributes)
        # the cap on query requests in flight, as this module names it (MAX_RPCS)
        self.queries = ProspectorQueries(self, self.tree, rng, self.config, self.counters, MAX_RPCS)

    # -- lifetime and attributes -----------------------------------------------------------
    def start(self, now: float) -> None:
        """Arm the first update (the driver calls this once when the node comes up)."""
        self.tree.start(now)

    def set_attributes(self, attributes: Mapping[str, Any], now: float) -> None:
        """Publish this node's attributes (replacing the previous ones); raises ``ValueError``
        naming an attribute that cannot be published."""
        self.tree.set_attributes(attributes, now)

    # -- read-only views (the tree's) ------------------------------------------------------
    def summary(self) -> Summary:
        """This node's subtree: its own attributes merged with its live children's."""
        return self.tree.summary()

    @property
    def is_root(self) -> bool:
        """This node believes it is the root (it knows no live node closer to the tree's key)."""
        return self.tree.is_root

    def preferred_parent(self, now: float) -> Contact | None:
        """The next hop towards the tree's key, skipping suspected contacts; None at the root."""
        return self.tree.preferred_parent(now)

    # the tree's state, read-only from here (types: see AggregationTree)
    attributes = _from_tree("attributes", "This node's published attributes (normalized).")
    parent = _from_tree("parent", "The acked parent (None: root, or not attached yet).")
    depth = _from_tree("depth", "Hops from the root (0 at the root; None while unknown).")
    root = _from_tree("root", "The root's contact as the acks (or the answers of queries) last told it.")
    grandparent = _from_tree("grandparent", "The parent's parent, told by its acks: where to report the parent's death.")
    children = _from_tree("children", "The children's entries by node id.")
    suspicions = _from_tree("suspicions", "The contacts the node avoids for a while (the overlay's list, backed by its detector).")
    epoch = _from_tree("epoch", "This incarnation: a restarted node's updates replace its old entry whatever their seq.")
    seq = _from_tree("seq", "The sequence number of this node's latest update.")

    # -- API (the queries') ----------------------------------------------------------------
    def prospect(self, requirement: str | Requirement, n: int, now: float) -> int:
        """Find up to ``n`` nodes that satisfy ``requirement``; emits ``ProspectFinished``.

        Raises :class:`~p2pdeploy.resource.requirements.ParseError` for a malformed requirement
        and ``ValueError`` for ``n < 1``."""
        return self.queries.prospect(requirement, n, now)

    def aggregate(self, attribute: str | None, fn: str, now: float) -> int:
        """Ask the root for ``fn`` of ``attribute`` over the tree; emits ``AggregateFinished``.

        ``fn`` is one of ``FUNCTIONS``; ``aggregate(None, "count")`` counts the nodes."""
        return self.queries.aggregate(attribute, fn, now)

    # -- inputs ----------------------------------------------------------------------------
    def handle_event(self, event: Any, now: float) -> bool:
        """This node's new description, to publish; or the end of a root lookup the tree
        started, which only filled the routing table (the next update finds its parent there)."""
        return self.tree.handle_event(event, now)

    def receive(self, src: Address, msg: Any, now: float) -> None:
        if getattr(msg, "tree", self.key) != self.key:
            self.dropped["foreign_tree"] += 1
            return
        kind = type(msg)
        if kind in TREE_MESSAGES:
            self.tree.receive(src, msg, now)
        elif kind in QUERY_MESSAGES:
            self.queries.receive(src, msg, now)
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if not self.tree.on_timer(name, now):
            self.queries.on_timer(name, now)


__all__ = [
    "FUNCTIONS",
    "MAX_RPCS",
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
    "next_for_spread",
    "spread_pick",
]
