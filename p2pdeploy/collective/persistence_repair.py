"""Repair of replicated persistence: the reconciler of each held key, and the holders' watch.

Every ``repair_interval_s`` a node checks each key it holds that nobody checked during the
interval (:class:`Check`): it searches for the key's r closest live nodes, pushes its copy to
those that lack one (handoff on join), and drops its own copy when it is not among them while
they all hold it. The holders of a key watch one another (a ``HolderPing`` every
``watch_interval_s``, one per peer whatever the number of keys); when a holder stops answering,
every key it held with this node that is now more than one copy short is checked at once
(:meth:`Repair.peer_gone`), and one copy short waits for the next round (lazy repair: the
holder may be back with its disk). Chunks are scrubbed against their hash, and a corrupt copy
is fetched again. :class:`Leave` hands every key to the next closest nodes before a graceful
departure. Only what this node is authorized to keep is repaired or handed off: chunks with a
live pin by a key it trusts, records written by such a key
(:mod:`~p2pdeploy.collective.persistence_admission`); each round also collects the chunks left
unpinned and the untrusted writers' records kept past their grace periods, forgets the quorum
promises that no value followed in time, and renews the pins this node signed of the chunks it keeps.

:class:`Repair` is the part of the :class:`~p2pdeploy.collective.persistence.Persistence` layer
that runs these rounds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.persistence_blobs import Fetch
from p2pdeploy.collective.persistence_messages import (
    KIND_CHUNK,
    KIND_RECORD,
    MAX_REPLICAS,
    PURPOSE_HANDOFF,
    PURPOSE_REPAIR,
    PURPOSES,
    ChunkCorrupted,
    HolderPing,
    StoreChunk,
    Stored,
    StorePin,
    StoreRecord,
)
from p2pdeploy.collective.persistence_search import Op, Rpc, Search
from p2pdeploy.collective.records import check_record
from p2pdeploy.core import Address, Rng
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import newer

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import Persistence, PersistenceConfig
    from p2pdeploy.collective.persistence_store import DurableStore
    from p2pdeploy.overlay.kademlia import Kademlia


class Check(Op):
    """The repair reconciler for one key this node holds (chunk or eventual record)."""

    def __init__(self, op_id: int, key: int, kind: int, replicas: int, *, leaving: bool = False,
                 parent: int | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.kind = kind
        self.replicas = replicas
        self.leaving = leaving
        #: A hand-off waits for its copies to be acknowledged (or to time out): the node may
        #: stop right after, cutting a transfer still under way. A copy refused or unanswered
        #: goes to the next closest node that lacks the key (a ``spare``) instead.
        self.waiting = 0
        self.acknowledged = 0
        self.ranked: list[Contact] = []
        self.spares: list[Contact] = []
        self.message: Any = None

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        self.ranked = search.ranked() if self.leaving else p._rank_with_self(search.ranked(), self.key)
        targets = self.ranked[: self.replicas]
        if self.kind == KIND_CHUNK:
            self._chunk(p, targets, search, now)
        else:
            self._record(p, targets, search, now)
        if self.waiting == 0:
            p._finish(self, now)

    def _copy(self, p: Persistence, contact: Contact, msg: Any, now: float) -> None:
        if self.leaving:
            self.waiting += 1
            self.message = msg
            p._request(contact, msg, self, now, timeout_s=p.config.handoff_timeout_s)
        else:
            p._request(contact, msg, None, now)

    def _set_spares(self, lacks: Callable[[Contact], bool]) -> None:
        if self.leaving:
            self.spares = [c for c in self.ranked[self.replicas:] if lacks(c)]

    def on_reply(self, p: Persistence, rpc: Rpc, msg: Any, now: float) -> None:
        if isinstance(msg, Stored):
            self.acknowledged += msg.ok
            self._copied(p, msg.ok, now)

    def on_timeout(self, p: Persistence, rpc: Rpc, now: float) -> None:
        if rpc.kind in (StoreChunk, StoreRecord):
            self._copied(p, False, now)

    def _copied(self, p: Persistence, ok: bool, now: float) -> None:
        self.waiting -= 1
        if not ok and self.spares:
            p.counters["handoff_spares"] += 1
            self._copy(p, self.spares.pop(0), self.message, now)
        if self.waiting == 0:
            p._finish(self, now)

    def _chunk(self, p: Persistence, targets: list[Contact], search: Search, now: float) -> None:
        info = p.store.chunk_info(self.key)
        if info is None or not p.live(info, now):
            return  # not this node's to spread (a stranger's, or no longer pinned)
        purpose = PURPOSE_HANDOFF if self.leaving else PURPOSE_REPAIR
        def lacks(c: Contact) -> bool:
            return c.node_id != p.node_id and not (search.replies.get(c.node_id) and search.replies[c.node_id].has)

        lacking = [c for c in targets if lacks(c)]
        self._set_spares(lacks)
        if not self.leaving:
            p._watch(self.key, [c for c in targets if c.node_id != p.node_id], now, reset=True)
        data = p.store.read_chunk(self.key) if lacking else b""  # read (and hash) only to send it
        if data is None:
            p._drain_corrupted(now)
            return
        for contact in lacking:
            p.counters[f"{PURPOSES[purpose]}_chunks"] += 1
            p.counters[f"{PURPOSES[purpose]}_bytes"] += len(data)
            self._copy(p, contact, StoreChunk(0, p.node_id, self.key, data, self.replicas, purpose, info.pin), now)
        if self.key in p._pin_news and info.pin is not None:  # a renewed pin for the holders that have the key
            p._pin_news.discard(self.key)
            for contact in targets:
                if contact.node_id != p.node_id and contact not in lacking:
                    p._request(contact, StorePin(0, p.node_id, self.key, info.pin), None, now)
        responsible = any(c.node_id == p.node_id for c in targets)
        if not responsible and not lacking and not info.pinned and len(targets) >= self.replicas:
            p.store.delete_chunk(self.key)  # a surplus copy: the r closest all hold the key
            p._peers.pop(self.key, None)
            p.counters["surplus_dropped"] += 1

    def _record(self, p: Persistence, targets: list[Contact], search: Search, now: float) -> None:
        mine = p.store.read_record(self.key)
        if mine is None or not p.trusts(mine[0].public_key):
            return
        item, replicas = mine
        for reply in search.replies.values():  # a newer copy elsewhere replaces ours
            if reply.item is not None and newer(reply.item, item) and check_record(
                    self.key, reply.item, p.config.max_record_bytes) is None:
                item = reply.item
                p.store.write_record(self.key, item, replicas, since=p.wall(now))
        purpose = PURPOSE_HANDOFF if self.leaving else PURPOSE_REPAIR
        def lacks(contact: Contact) -> bool:
            reply = search.replies.get(contact.node_id)
            return contact.node_id != p.node_id and (reply is None or reply.item is None or newer(item, reply.item))

        lacking = [c for c in targets if lacks(c)]
        self._set_spares(lacks)
        if not self.leaving:
            p._watch(self.key, [c for c in targets if c.node_id != p.node_id], now, reset=True)
        for contact in lacking:
            p.counters[f"{PURPOSES[purpose]}_records"] += 1
            self._copy(p, contact, StoreRecord(0, p.node_id, self.key, item, replicas, purpose), now)
        responsible = any(c.node_id == p.node_id for c in targets)
        if not responsible and not lacking and len(targets) >= self.replicas:
            p.store.delete_record(self.key)
            p._peers.pop(self.key, None)
            p.counters["surplus_dropped"] += 1


class Leave(Op):
    def __init__(self, op_id: int, keys: list[tuple[int, int, int]]) -> None:
        super().__init__(op_id, 0)
        self.keys = keys
        self.running = 0
        self.copies = 0

    def start(self, p: Persistence, now: float) -> None:
        for key, kind, replicas in self.keys:
            self.running += 1
            p._start(Check(p._next_id(), key, kind, replicas, leaving=True, parent=self.op_id), now)
        if self.running == 0:
            p._finish(self, now)

    def on_child(self, p: Persistence, child: Op, now: float) -> None:
        self.running -= 1
        if isinstance(child, Check):
            self.copies += child.acknowledged
        if self.running == 0:
            p._finish(self, now)


class Repair:
    """Repair rounds, the holders' watch and the scrub of the
    :class:`~p2pdeploy.collective.persistence.Persistence` layer."""

    overlay: Kademlia
    store: DurableStore
    config: PersistenceConfig
    rng: Rng
    node_id: int
    counters: Counter[str]
    leaving: bool
    _ops: dict[int, Op]
    _checked_at: dict[int, float]
    _peers: dict[int, dict[int, Contact]]
    _probing: dict[int, Contact]
    _watching: bool
    _checking: set[int]
    _pin_news: set[int]

    def _repair_round(self, now: float) -> None:
        """Check every held key nobody checked during the last interval (bounded per round)."""
        interval = self.config.repair_interval_s
        horizon = now - interval
        if not self.overlay.closest_known(self.node_id, 1) and (self.store.chunk_infos() or self.store.record_keys()):
            self.set_timer("repair", now + self.config.rejoin_check_s)  # not joined yet: nobody to check with
            return
        self._drain_corrupted(now)  # e.g. chunks a restarted store found missing when it opened
        self.collect(now)
        self.collect_acceptor_state(now)
        for key in self.refresh_pins(now):
            self._checked_at.pop(key, None)  # due now: its holders get the new pin
        running = sum(1 for op in self._ops.values() if isinstance(op, Check))
        budget = self.config.max_checks - running
        due: list[tuple[int, int, int]] = []
        chunks = self.store.chunk_infos()
        for info in chunks:
            if self._checked_at.get(info.key, -math.inf) <= horizon and self.live(info, now):
                due.append((info.key, KIND_CHUNK, info.replicas))
        for key in self.store.record_keys():
            if self._checked_at.get(key, -math.inf) <= horizon:
                stored = self.store.read_record(key)
                if stored is not None and self.trusts(stored[0].public_key):
                    due.append((key, KIND_RECORD, stored[1]))
        held = {info.key for info in chunks} | set(self.store.record_keys())
        for key in [k for k in self._checked_at if k not in held]:
            del self._checked_at[key]
        for key in [k for k in self._peers if k not in held]:
            del self._peers[key]
        for key, kind, replicas in due[: max(0, budget)]:
            self._check(key, kind, replicas, now)
        # a backlog is worked through sooner than the next full interval
        self.set_timer("repair", now + (interval if len(due) <= budget else min(interval, 5.0)))

    def _check(self, key: int, kind: int, replicas: int, now: float) -> None:
        """Start the repair check of a held key (unless one is under way)."""
        self._checked_at[key] = now
        if key in self._checking:
            return
        self._checking.add(key)
        self.counters["checks"] += 1
        self._start(Check(self._next_id(), key, kind, min(replicas, self.config.max_replicas)), now)

    # -- watching the other holders ----------------------------------------------------------
    def peer_gone(self, node_id: int, now: float) -> None:
        """Evidence that ``node_id`` is gone (it did not answer): every key this node holds with
        it that is now more than one copy short (fewer than max(2, r - 1) live copies known) is
        checked now, without waiting for the next repair round; one copy short is left to that
        round. (A failure detector's verdict may be fed in here too.)"""
        self._probing.pop(node_id, None)
        for key, peers in list(self._peers.items()):
            if peers.pop(node_id, None) is None:
                continue
            info = self.store.chunk_info(key)
            if info is not None:
                kind, replicas = KIND_CHUNK, info.replicas
            else:
                stored = self.store.read_record(key)
                if stored is None:
                    del self._peers[key]
                    continue
                kind, replicas = KIND_RECORD, stored[1]
            if len(peers) + 1 >= max(2, replicas - 1):
                continue  # one copy short is left to the next round: the holder may be back with its disk
            if key not in self._checking:
                self.counters["checks_triggered"] += 1
                self._check(key, kind, replicas, now)

    def _watch(self, key: int, contacts: list[Contact], now: float, *, reset: bool = False) -> None:
        """``contacts`` hold ``key`` as this node does: probe them from now on (``reset``: only them)."""
        peers = self._peers.get(key)
        if peers is None or reset:
            peers = self._peers[key] = {}
        for contact in contacts:
            if contact.node_id != self.node_id:
                peers.pop(contact.node_id, None)
                peers[contact.node_id] = contact
        limit = MAX_REPLICAS + self.config.search_margin
        while len(peers) > limit:  # the oldest checkers first
            del peers[next(iter(peers))]
        if peers and not self._watching and not self.leaving:
            self._watching = True
            self.set_timer("watch", now + self.config.watch_interval_s * self.rng.uniform(0.5, 1.0))

    def _watch_round(self, now: float) -> None:
        """Ping every peer that holds a key with this node (once, however many keys)."""
        self._probing.clear()
        if self.leaving:
            self._watching = False
            return
        for peers in self._peers.values():
            for node_id, contact in peers.items():
                self._probing.setdefault(node_id, contact)
        if not self._probing:
            self._watching = False
            return
        for contact in self._probing.values():
            self.send(contact.address, HolderPing(self.rng.getrandbits(63), self.node_id))
        self.counters["probes"] += len(self._probing)
        self.set_timer("watch-verdict", now + self.config.rpc_timeout_s)
        self.set_timer("watch", now + self.config.watch_interval_s)

    def _watch_verdict(self, now: float) -> None:
        silent, self._probing = self._probing, {}
        for node_id in silent:
            self.counters["probes_unanswered"] += 1
            self.overlay.unreachable(node_id)
            self.peer_gone(node_id, now)

    def _alive(self, node_id: int, src: Address) -> bool:
        """A probed peer was heard from (at the address probed): True if it was being probed."""
        contact = self._probing.get(node_id)
        if contact is None or contact.address != src:
            return False
        del self._probing[node_id]
        return True

    def _scrub(self, now: float) -> None:
        for info in self.store.chunk_infos():
            self.store.verify_chunk(info.key)
        self._drain_corrupted(now)

    def _drain_corrupted(self, now: float) -> None:
        """Copies that failed their hash check were dropped by the store: fetch them again."""
        for info in self.store.take_corrupted():
            self.counters["corrupt_chunks"] += 1
            self.emit(ChunkCorrupted(info.key))
            op = Fetch(self._next_id(), info.key, None, restore=info)
            self._start(op, now)
