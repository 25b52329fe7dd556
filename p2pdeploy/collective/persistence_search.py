"""The holder search of replicated persistence: who are the nodes closest to a key, and which hold it.

An iterative search with the overlay's :class:`~p2pdeploy.overlay.lookup.Lookup` query object,
seeded from ``closest_known`` and driven by persistence's own ``FindHolders`` request, which
every node answers with the contacts it knows closest to the key *and whether it holds the key*
(:meth:`HolderSearch._holders`). One round trip both routes and tells who has what, so a fetch
can start downloading from the first holder the search meets and a repair check learns in the
same search which of the r closest lack a copy. A search that meets fewer live nodes than it
wanted searches once more as wide as an overlay lookup.

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
    FindHolders,
    Holders,
)
from p2pdeploy.core import Address
from p2pdeploy.overlay.lookup import CandidateState, Lookup
from p2pdeploy.overlay.routing import Contact

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import Persistence, PersistenceConfig
    from p2pdeploy.collective.persistence_store import DurableStore
    from p2pdeploy.collective.records import Ballot
    from p2pdeploy.overlay.kademlia import Kademlia


@dataclass(slots=True)
class Rpc:
    rpc_id: int
    contact: Contact
    op_id: int | None
    kind: type


@dataclass(slots=True)
class Search:
    """An iterative search for the nodes closest to ``key``, recording who holds it."""

    key: int
    kind: int
    check: bool
    replicas: int
    lookup: Lookup
    replies: dict[int, Holders] = field(default_factory=dict)
    #: Nodes that did not answer, over every round of the search.
    failed: dict[int, Contact] = field(default_factory=dict)
    widened: bool = False
    finished: bool = False

    def ranked(self) -> list[Contact]:
        """Nodes that answered, closest first."""
        return [c.contact for c in self.lookup.closest_answered()]

    def closest_seen(self, count: int, own: Contact) -> list[tuple[Contact, bool]]:
        """The ``count`` closest nodes met, with whether each answered (``own`` counts as answered)."""
        met = {c.contact.node_id: (c.contact, True) for c in self.lookup.by_id.values()
               if c.state is CandidateState.answered}
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
    _checked_at: dict[int, float]
    promise_floor: Ballot

    def _search(self, op: Op, kind: int, check: bool, replicas: int, now: float, *,
                announce: bool = False) -> None:
        """Search the nodes closest to ``op.key``, asking ``replicas`` plus a margin to answer.
        ``announce``: tell them the key's replication factor (a reader does not know it)."""
        width = replicas + self.config.search_margin
        seeds = self.overlay.closest_known(op.key, 2 * width)
        lookup = Lookup(op.key, seeds, k=width, alpha=self.config.alpha, own_id=self.node_id)
        op.search = Search(op.key, kind, check, replicas if announce else 0, lookup)
        self._advance(op, now)

    def _advance(self, op: Op, now: float) -> None:
        search = op.search
        assert search is not None
        request = FindHolders(0, self.node_id, search.key, search.kind, search.check, search.replicas)
        for contact in search.lookup.next_requests():
            self._request(contact, request, op, now)
        if search.lookup.done and not search.lookup.waiting() and not search.finished:
            if self._widen(search):
                self._advance(op, now)
                return
            search.finished = True
            op.on_search_done(self, now)

    def _widen(self, search: Search) -> bool:
        """Fewer nodes answered than the search wanted: the known neighbourhood of the key is
        mostly gone (churn). Search once more as wide as an overlay lookup (its k), from farther
        contacts too, so nodes that joined near the key since are found; True if it did."""
        lookup = search.lookup
        wide = self.overlay.config.k
        answered = lookup.closest_answered()
        if search.widened or len(answered) >= lookup.k or wide <= lookup.k:
            return False
        search.widened = True
        seeds = [c for c in self.overlay.closest_known(search.key, 2 * wide + len(search.failed))
                 if c.node_id not in search.failed]
        known = {c.node_id for c in seeds}
        seeds += [c.contact for c in answered if c.contact.node_id not in known]
        search.lookup = Lookup(search.key, seeds[: 2 * wide + len(answered)], k=wide, alpha=self.config.alpha,
                               own_id=self.node_id)
        for node_id, reply in search.replies.items():  # no need to ask those again
            search.lookup.answered(node_id, [c for c in reply.contacts if c.node_id != self.node_id
                                             and c.node_id not in search.failed])
        self.counters["searches_widened"] += 1
        return True

    def _on_holders(self, op: Op, rpc: Rpc, msg: Holders, now: float) -> None:
        """An answer to the search of ``op``: route on, and tell the op who holds the key."""
        search = op.search
        if search is None or search.finished:
            return
        search.replies[msg.sender] = msg
        contact = rpc.contact
        search.lookup.answered(msg.sender, [c for c in msg.contacts if c.node_id != self.node_id])
        op.on_holder(self, contact, msg, now)  # type: ignore[arg-type]
        if not op.done:
            self._advance(op, now)

    def _on_search_timeout(self, op: Op, rpc: Rpc, now: float) -> None:
        if op.search is not None and not op.search.finished:
            op.search.lookup.failed(rpc.contact.node_id)
            op.search.failed[rpc.contact.node_id] = rpc.contact
            self._advance(op, now)

    def _holders(self, msg: FindHolders, src: Address, now: float) -> Holders:
        contacts = [c for c in self.overlay.closest_known(msg.key, self.config.reply_contacts + 1)
                    if c.node_id != msg.sender][: self.config.reply_contacts]
        has, sequence, item = False, 0, None
        if msg.kind == KIND_CHUNK:
            info = self.store.chunk_info(msg.key)
            has = info is not None
            replicas = min(msg.replicas, self.config.max_replicas)
            if has and replicas > info.replicas:
                self.store.update_chunk(msg.key, replicas, info.pinned)
        elif msg.kind == KIND_RECORD:
            stored = self.store.read_record(msg.key)
            if stored is not None:
                has, item, sequence = True, stored[0], stored[0].sequence
        elif msg.kind == KIND_QUORUM:
            state = self.store.read_acceptor(msg.key)
            if state is not None:
                has, sequence = state.has_value, state.promised.counter
            else:  # what this node promises every key it holds nothing for
                sequence = self.promise_floor.counter
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
