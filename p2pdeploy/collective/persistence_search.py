"""The holder search of replicated persistence: who are the nodes closest to a key, and which hold it.

The overlay finds the nodes: a search starts an overlay lookup of the key as wide as it needs
(``Kademlia.lookup(key, now, k=r + search_margin)``) and consumes its ``LookupFinished``; then
it asks those closest live nodes, with a ``FindHolders`` each, whether they hold the key
(:meth:`HolderSearch._holders` answers, for records with the record itself, for quorum keys with
the acceptor's ballot). A fetch starts downloading from the first holder that answers; a repair
check learns which of the r closest lack a copy. A lookup that finds fewer live nodes than the
search wanted (the known neighbourhood of the key left) is run once more as wide as a plain
overlay lookup (its k), and every node it finds is asked.

Here too the base of every multi-step operation (:class:`Op`) and the record of a request in
flight (:class:`Rpc`). :class:`HolderSearch` is the part of the
:class:`~p2pdeploy.collective.persistence.Persistence` layer that runs searches and answers them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.persistence_messages import (
    KIND_CHUNK,
    KIND_QUORUM,
    KIND_RECORD,
    MAX_REPLICAS,
    FindHolders,
    Holders,
)
from p2pdeploy.core import Address
from p2pdeploy.overlay.kademlia import LookupFinished
from p2pdeploy.overlay.routing import Contact

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import Persistence, PersistenceConfig
    from p2pdeploy.collective.persistence_store import DurableStore
    from p2pdeploy.overlay.kademlia import Kademlia


@dataclass(slots=True)
class Rpc:
    rpc_id: int
    contact: Contact
    op_id: int | None
    kind: type


@dataclass(slots=True)
class Search:
    """The nodes closest to ``key`` and who of them holds it: an overlay lookup, then ``FindHolders``."""

    key: int
    kind: int
    check: bool
    replicas: int
    #: How many closest nodes the search wants (r plus the margin).
    width: int
    #: The overlay lookup under way (its query id), 0 once it finished.
    query_id: int = 0
    #: The nodes asked what they hold, closest first.
    asked: list[Contact] = field(default_factory=list)
    #: Asked nodes whose answer is still awaited.
    waiting: set[int] = field(default_factory=set)
    replies: dict[int, Holders] = field(default_factory=dict)
    #: Nodes that did not answer, the lookup's and the asked ones.
    failed: dict[int, Contact] = field(default_factory=dict)
    widened: bool = False
    finished: bool = False

    def ranked(self) -> list[Contact]:
        """Nodes that answered, closest first."""
        return [c for c in self.asked if c.node_id in self.replies]

    def closest_seen(self, count: int, own: Contact) -> list[tuple[Contact, bool]]:
        """The ``count`` closest nodes met, with whether each answered (``own`` counts as answered)."""
        met = {c.node_id: (c, True) for c in self.ranked()}
        for node_id, contact in self.failed.items():
            met.setdefault(node_id, (contact, False))
        met[own.node_id] = (own, True)
        return sorted(met.values(), key=lambda pair: pair[0].node_id ^ self.key)[:count]


class Op:
    """Multi-step work with an id; ``parent`` is the op waiting for this one to finish."""

    def __init__(self, op_id: int, key: int, parent: int | None = None) -> None:
        self.op_id = op_id
        self.key = key
        self.parent = parent
        self.search: Search | None = None
        self.done = False

    # hooks, overridden by the operations that need them
    def on_sent(self, rpc_id: int) -> None:
        pass

    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        pass

    def on_search_done(self, p: Persistence, now: float) -> None:
        pass

    def on_reply(self, p: Persistence, rpc: Rpc, msg: Any, now: float) -> None:
        pass

    def on_timeout(self, p: Persistence, rpc: Rpc, now: float) -> None:
        pass

    def on_child(self, p: Persistence, child: Op, now: float) -> None:
        pass

    def on_timer(self, p: Persistence, now: float) -> None:
        pass


class HolderSearch:
    """The holder search of the :class:`~p2pdeploy.collective.persistence.Persistence` layer."""

    overlay: Kademlia
    store: DurableStore
    config: PersistenceConfig
    node_id: int
    contact: Contact
    counters: Counter[str]
    dropped: Counter[str]
    _ops: dict[int, Op]
    _checked_at: dict[int, float]
    #: The overlay lookups of this layer's searches: query id -> op id.
    _lookups: dict[int, int]

    def _search(self, op: Op, kind: int, check: bool, replicas: int, now: float, *,
                announce: bool = False) -> None:
        """Search the nodes closest to ``op.key``, asking ``replicas`` plus a margin what they hold.
        ``announce``: tell them the key's replication factor (a reader does not know it)."""
        width = replicas + self.config.search_margin
        op.search = Search(op.key, kind, check, replicas if announce else 0, width)
        self._look_up(op, width, now)

    def _look_up(self, op: Op, k: int | None, now: float) -> None:
        search = op.search
        assert search is not None
        search.query_id = self.overlay.lookup(search.key, now, k=k)
        self._lookups[search.query_id] = op.op_id

    def _on_lookup(self, event: LookupFinished, now: float) -> bool:
        """The overlay's answer to a search's lookup: ask the closest nodes what they hold.
        True if the lookup was this layer's (the event goes no further)."""
        op_id = self._lookups.pop(event.query_id, None)
        if op_id is None:
            return False
        op = self._ops.get(op_id)
        search = op.search if op is not None else None
        if op is None or search is None or search.query_id != event.query_id or search.finished:
            return True  # the op ended, or searched again
        search.query_id = 0
        for contact in event.unanswered:
            search.failed.setdefault(contact.node_id, contact)
        wide = self.overlay.config.k
        if len(event.closest) < search.width and not search.widened and wide > search.width:
            # the known neighbourhood of the key is mostly gone (churn): look once more as wide
            # as an overlay lookup, so nodes that joined near the key since are found
            search.widened = True
            self.counters["searches_widened"] += 1
            self._look_up(op, None, now)
            return True
        request = FindHolders(0, self.node_id, search.key, search.kind, search.check, search.replicas)
        for contact in event.closest:
            if contact.node_id == self.node_id:
                continue
            search.asked.append(contact)
            search.waiting.add(contact.node_id)
            self._request(contact, request, op, now)
        self._search_progress(op, now)
        return True

    def _on_holders(self, op: Op, rpc: Rpc, msg: Holders, now: float) -> None:
        """A node the search asked said what it holds."""
        search = op.search
        if search is None or search.finished or msg.sender not in search.waiting:
            return
        search.waiting.discard(msg.sender)
        search.replies[msg.sender] = msg
        op.on_holder(self, rpc.contact, msg, now)  # type: ignore[arg-type]
        if not op.done:
            self._search_progress(op, now)

    def _on_search_timeout(self, op: Op, rpc: Rpc, now: float) -> None:
        search = op.search
        if search is None or search.finished or rpc.contact.node_id not in search.waiting:
            return
        search.waiting.discard(rpc.contact.node_id)
        search.failed[rpc.contact.node_id] = rpc.contact
        self._search_progress(op, now)

    def _search_progress(self, op: Op, now: float) -> None:
        search = op.search
        assert search is not None
        if not search.waiting and not search.query_id and not search.finished:
            search.finished = True
            op.on_search_done(self, now)  # type: ignore[arg-type]

    def _holders(self, msg: FindHolders, src: Address, now: float) -> Holders:
        contacts = [c for c in self.overlay.closest_known(msg.key, self.config.reply_contacts + 1)
                    if c.node_id != msg.sender][: self.config.reply_contacts]
        has, sequence, item = False, 0, None
        if msg.kind == KIND_CHUNK:
            info = self.store.chunk_info(msg.key)
            has = info is not None
            if has and msg.replicas > info.replicas and msg.replicas <= MAX_REPLICAS:
                self.store.update_chunk(msg.key, msg.replicas, info.pinned)
        elif msg.kind == KIND_RECORD:
            stored = self.store.read_record(msg.key)
            if stored is not None:
                has, item, sequence = True, stored[0], stored[0].sequence
        elif msg.kind == KIND_QUORUM:
            state = self.store.read_acceptor(msg.key)
            if state is not None:
                has, sequence = state.has_value, state.promised.counter
        else:
            self.dropped["bad_kind"] += 1
        if has and msg.check and self._responsible(msg.key, msg.replicas or self.config.replicas):
            self._checked_at[msg.key] = now  # checked for us; a surplus copy still checks itself, to drop
            # the checker holds the key too (it checks only what it holds): if it goes, check at once
            self._watch(msg.key, [Contact(msg.sender, src)], now)
        return Holders(msg.rpc_id, self.node_id, contacts, has, sequence, item, msg.check)

    def _responsible(self, key: int, replicas: int) -> bool:
        """True when this node is among the ``replicas`` closest to ``key`` that it knows of."""
        known = self.overlay.closest_known(key, replicas)
        return any(c.node_id == self.node_id for c in self._rank_with_self(known, key)[:replicas])

    def _rank_with_self(self, contacts: list[Contact], key: int) -> list[Contact]:
        ranked = [c for c in contacts if c.node_id != self.node_id] + [self.contact]
        ranked.sort(key=lambda c: c.node_id ^ key)
        return ranked
