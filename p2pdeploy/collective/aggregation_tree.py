"""The aggregation tree of the resource prospector: parents, children, updates, acks, the root.

**The tree** (SDIMS and Willow). The tree named ``config.tree`` is rooted at the node closest
to ``key_id(tree)``; a node's parent is its next hop towards that key as Kademlia sees it
(``closest_known``, skipping contacts the node suspects), so the parent is always closer to
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
  ``suspect_s`` (in the node's one list, :mod:`~p2pdeploy.overlay.suspicion`, shared with the
  other layers and backed by the failure detector) and the child re-parents at once to its next
  hop (churn repair);
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

Not here: the queries that read the tree (:mod:`p2pdeploy.collective.prospector_queries`), and
the protocol object that hosts both (:class:`~p2pdeploy.collective.prospector.Prospector`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.collective.aggregation import (
    Summary,
    WireValue,
    attributes_from_wire,
    attributes_to_wire,
    merge,
    normalize_attributes,
    subtract,
    summarise,
    summary_problem,
)
from p2pdeploy.collective.prospector_config import ProspectorConfig
from p2pdeploy.core import Address, Protocol, Rng
from p2pdeploy.overlay.kademlia import Kademlia, LookupFinished
from p2pdeploy.overlay.routing import Contact, next_hop_towards
from p2pdeploy.resource.description import DescriptionChanged
from p2pdeploy.wire import NodeId, message

# -- messages (wire tags 80-82, 87) ---------------------------------------------------------


@message(80)
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
class AggregateAck:
    """Parent to child: update ``seq`` arrived; the parent's depth (-1: unknown), root and parent."""

    sender: NodeId
    tree: NodeId
    seq: int
    depth: int
    root: Contact | None
    parent: Contact | None


@message(82)
class Detach:
    """Child to its former parent: drop my entry (I am counted elsewhere now)."""

    sender: NodeId
    tree: NodeId
    epoch: int
    seq: int


@message(87)
class Orphaned:
    """Child to its grandparent: my parent ``lost`` stopped answering. Its entry there still
    counts my subtree (``summary``, as the parent last acked it), which my new parent counts now."""

    sender: NodeId
    tree: NodeId
    lost: NodeId
    summary: Summary


TREE_MESSAGES = (AggregateUpdate, AggregateAck, Detach, Orphaned)

# -- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    """A parent's entry for one child: its last update, replaced by the next, dropped when it expires."""

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


class AggregationTree:
    """One node's part of the aggregation tree, hosted by a protocol object (the
    :class:`~p2pdeploy.collective.prospector.Prospector`): the tree sends, sets timers and counts
    dropped input through its ``host``, and counts its work in the shared ``counters``."""

    def __init__(
        self,
        host: Protocol,
        overlay: Kademlia,
        contact: Contact,
        rng: Rng,
        config: ProspectorConfig,
        counters: Counter[str],
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.overlay = overlay
        self.node_id = contact.node_id
        self.contact = contact
        self.rng = rng
        self.config = config
        self.key = config.key
        self.limits = config.limits
        self.counters = counters
        #: This incarnation: a restarted node's updates replace its old entry whatever their seq.
        self.epoch = rng.getrandbits(62)
        self.seq = 0
        self.attributes: dict[str, Any] = {}
        self.wire_attributes: dict[str, WireValue] = {}
        self._own_summary = summarise({}, self.contact, self.limits)
        #: The acked parent (None: root, or not attached yet).
        self.parent: Contact | None = None
        #: Hops from the root (0 at the root; None while unknown).
        self.depth: int | None = None
        #: The root's contact as the acks (or the answers of queries) last told it.
        self.root: Contact | None = None
        #: The parent's parent, told by its acks: where to report the parent's death.
        self.grandparent: Contact | None = None
        #: The subtree summary the parent acked last (what its entry for us counts).
        self._acked_summary: Summary | None = None
        self._lookup_at = float("-inf")
        #: Query ids of this tree's own overlay lookups, whose ``LookupFinished`` it consumes.
        self._root_lookups: set[int] = set()
        self.children: dict[int, Child] = {}
        #: The node's suspicions (the overlay's: one list for every layer, backed by its detector).
        self.suspicions = overlay.suspicions
        self._pending: dict[int, _Pending] = {}
        self._summary: Summary | None = None
        self._dirty = True
        self._last_push_at = float("-inf")
        self._last_sent: tuple[int, Summary, dict[str, WireValue]] | None = None
        self._started = False
        if attributes:
            self._set(attributes)

    # -- lifetime and attributes -----------------------------------------------------------
    def start(self, now: float) -> None:
        """Arm the first update (the driver calls this once when the node comes up)."""
        if self._started:
            return
        self._started = True
        # spread the first updates of nodes started together over the rate-bound interval
        self.host.set_timer("push", now + self.rng.uniform(0, self.config.min_update_interval_s))

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
        self.wire_attributes = attributes_to_wire(normalized)
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
        suspicions = self.suspicions
        return next_hop_towards(self.node_id, self.key, self.overlay.closest_known(self.key, self.config.parent_choices),
                                lambda node_id: suspicions.suspected(node_id, now))

    def is_suspected(self, node_id: int, now: float) -> bool:
        """``node_id`` is avoided: it did not ack our updates (or another layer's requests) lately,
        or the failure detector declared it dead."""
        return self.suspicions.suspected(node_id, now)

    def root_answered(self, contact: Contact) -> None:
        """A node answered as the root: requests for the root may go straight to it."""
        if contact.node_id != self.node_id:
            self.root = contact

    def root_silent(self, node_id: int) -> None:
        """``node_id`` did not answer: if it is the cached root, go parent by parent next time."""
        if self.root is not None and self.root.node_id == node_id:
            self.root = None

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
        kind = type(msg)
        if kind is AggregateUpdate:
            self._on_update(src, msg, now)
        elif kind is AggregateAck:
            self._on_ack(src, msg, now)
        elif kind is Detach:
            self._on_detach(msg, now)
        elif kind is Orphaned:
            self._on_orphaned(msg, now)
        else:
            self.host.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> bool:
        """Run the tree's timer ``name``; False when it is not one of the tree's."""
        if name == "push":
            self._push(now)
        elif name == "expire":
            self._expire(now)
        elif isinstance(name, tuple) and name[0] == "ack":
            self._on_ack_timeout(name[1], now)
        else:
            return False
        return True

    # -- the tree: updates, acks, detaches, expiry -----------------------------------------
    def _changed(self, now: float) -> None:
        self._summary = None
        self._dirty = True
        if not self._started:
            return
        due = max(now, self._last_push_at + self.config.min_update_interval_s)
        current = self.host.timer_deadline("push")
        if current is None or due < current:
            self.host.set_timer("push", due)

    def _push(self, now: float) -> None:
        c = self.config
        if self.overlay.contact_count() == 0:  # not joined yet: look again soon, send nothing
            self.host.set_timer("push", now + c.min_update_interval_s)
            return
        target = self.preferred_parent(now)
        if target is None:
            was_root = self.is_root
            self._act_as_root()
            self._dirty = False
            self._last_push_at = now
            if not was_root or self._root_by_suspicion(now):
                self._look_for_closer(now)
            self.host.set_timer("push", now + c.update_interval_s)
            return
        summary = self.summary()
        heartbeat_due = now >= self._last_push_at + c.update_interval_s
        unchanged = self._last_sent == (target.node_id, summary, self.wire_attributes)
        if unchanged and not heartbeat_due and self.parent is not None and self.parent.node_id == target.node_id:
            self._dirty = False
            self.host.set_timer("push", self._last_push_at + c.update_interval_s)
            return
        self.seq += 1
        msg = AggregateUpdate(self.node_id, self.key, self.epoch, self.seq, self.wire_attributes,
                              summary if self.children else None)
        self.host.send(target.address, msg)
        self._pending[self.seq] = _Pending(target, msg, summary, 1)
        self.host.set_timer(("ack", self.seq), now + c.ack_timeout_s)
        self.counters["updates_sent"] += 1
        self._last_sent = (target.node_id, summary, self.wire_attributes)
        self._last_push_at = now
        self._dirty = False
        self.host.set_timer("push", now + c.update_interval_s)

    def _act_as_root(self) -> None:
        if self.parent is not None:
            self._detach_from(self.parent)
            self.parent = None
        self.grandparent = None
        self.depth = 0
        self.root = self.contact

    def _root_by_suspicion(self, now: float) -> bool:
        own = self.node_id ^ self.key
        return any(node_id ^ self.key < own for node_id in self.suspicions.active(now))

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
        self.host.send(contact.address, Detach(self.node_id, self.key, self.epoch, self.seq))

    def _on_update(self, src: Address, msg: AggregateUpdate, now: float) -> None:
        if msg.sender == self.node_id or msg.sender ^ self.key <= self.node_id ^ self.key:
            self.host.dropped["inverted_update"] += 1  # a parent is closer to the key than its child
            return
        entry = self.children.get(msg.sender)
        if entry is not None and entry.epoch == msg.epoch and msg.seq <= entry.seq:
            self.counters["stale_updates"] += 1  # a retransmission or a late copy: ack, keep ours
            self._ack(src, msg)
            return
        if entry is None and len(self.children) >= self.config.max_children:
            self.host.dropped["too_many_children"] += 1  # no ack: the child will look elsewhere
            return
        attributes = attributes_from_wire(msg.attributes)
        if attributes is None:
            self.host.dropped["bad_attributes"] += 1
            return
        contact = Contact(msg.sender, src)
        if msg.summary is None:
            summary = summarise(attributes, contact, self.limits)
        elif summary_problem(msg.summary) is None:
            summary = msg.summary
        else:
            self.host.dropped["bad_summary"] += 1
            return
        changed = entry is None or entry.summary != summary or entry.wire_attributes != msg.attributes
        self.children[msg.sender] = Child(
            contact, msg.epoch, msg.seq, msg.attributes, attributes, summary, now + self.config.expiry_s
        )
        self.suspicions.clear(msg.sender)
        self.counters["updates_received"] += 1
        if self.host.timer_deadline("expire") is None:
            self.host.set_timer("expire", now + self.config.expiry_s)
        self._ack(src, msg)
        if changed:
            self._changed(now)

    def _ack(self, src: Address, msg: AggregateUpdate) -> None:
        depth = -1 if self.depth is None else self.depth
        self.host.send(src, AggregateAck(self.node_id, self.key, msg.seq, depth, self.root, self.parent))

    def _on_ack(self, src: Address, msg: AggregateAck, now: float) -> None:
        pending = self._pending.get(msg.seq)
        if pending is None or pending.contact.node_id != msg.sender or pending.contact.address != src:
            self.host.dropped["unsolicited_ack"] += 1
            return
        contact = pending.contact
        for seq in [s for s, p in self._pending.items() if s <= msg.seq and p.contact.node_id == contact.node_id]:
            del self._pending[seq]  # acks are cumulative: an older update lost on the way no longer matters
            self.host.cancel_timer(("ack", seq))
        self.suspicions.clear(contact.node_id)
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
            self.host.send(pending.contact.address, pending.msg)
            self.host.set_timer(("ack", seq), now + self.config.ack_timeout_s)
            return
        node_id = pending.contact.node_id
        self.counters["parents_suspected"] += 1
        self.suspicions.suspect(node_id, now + self.config.suspect_s, now)
        for other in [s for s, p in self._pending.items() if p.contact.node_id == node_id]:
            del self._pending[other]
            self.host.cancel_timer(("ack", other))
        self.root_silent(node_id)
        if self.parent is not None and self.parent.node_id == node_id:
            self._orphaned(self.parent)
        if self.parent is None or self.parent.node_id == node_id:
            self.parent = None
            self.depth = None
            self._dirty = True
            self.host.set_timer("push", now)  # repair at once: the rate bound is for refreshes

    def _orphaned(self, lost: Contact) -> None:
        """Our parent stopped answering. Its own parent still counts our subtree through the
        parent's entry, until that expires; tell it to stop, as our new parent will count us."""
        if self.grandparent is not None and self._acked_summary is not None:
            self.counters["orphaned_sent"] += 1
            self.host.send(self.grandparent.address, Orphaned(self.node_id, self.key, lost.node_id, self._acked_summary))
        self._detach_from(lost)  # in case it is only slow: it must not count us twice either
        self.grandparent = None
        self._acked_summary = None

    def _on_orphaned(self, msg: Orphaned, now: float) -> None:
        entry = self.children.get(msg.lost)
        if entry is None or msg.sender == msg.lost:
            self.counters["stale_orphaned"] += 1
            return
        if summary_problem(msg.summary) is not None:
            self.host.dropped["bad_summary"] += 1
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
            self.host.set_timer("expire", min(child.expires_at for child in self.children.values()))


__all__ = ["TREE_MESSAGES", "AggregateAck", "AggregateUpdate", "AggregationTree", "Detach", "Orphaned"]
