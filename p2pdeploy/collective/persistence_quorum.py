"""Quorum keys of replicated persistence: a CASPaxos round as the proposer, and the acceptor.

:class:`QuorumRound` is one linearizable read, put or compare-and-set of a quorum record
(:mod:`p2pdeploy.collective.records` holds the rules: ballots, promises, the change applied);
it locates the key's group with the holder search, then runs prepare and accept, retrying with a
higher ballot on conflict (after a random backoff that doubles with each attempt).

A read first *peeks*: it asks the group for their state with a prepare at ballot zero, which no
acceptor promises, so it changes nothing and competes with no writer. When a majority of the
group report the same accepted ballot, that record is chosen, and it is the latest: a write
acknowledged before the read began was accepted by a majority, which intersects this one. The
read returns it after one round trip. Otherwise (a write in progress, a silent member) it runs a
full round as any operation does. Concurrent reads of one key therefore do not fight each other
for ballots, and reads of a quiet key need no write to any acceptor's disk. :class:`QuorumAcceptor` is the part of the
:class:`~p2pdeploy.collective.persistence.Persistence` layer that answers as an acceptor, its
state durable in the store before any answer leaves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.persistence_messages import (
    KIND_QUORUM,
    Accept,
    Accepted,
    Holders,
    Prepare,
    Promise,
    QuorumValueAccepted,
)
from p2pdeploy.collective.persistence_search import Op, Rpc
from p2pdeploy.collective.records import (
    ZERO,
    AcceptorState,
    Ballot,
    Change,
    check_group,
    check_record,
    is_service_state,
    majority,
    on_accept,
    on_prepare,
    service_state_refusal,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import Persistence, PersistenceConfig
    from p2pdeploy.collective.persistence_store import DurableStore


class QuorumRound(Op):
    """One CASPaxos round (retried with a higher ballot on conflict) for a quorum key."""

    def __init__(self, op_id: int, key: int, change: Change, attempts: int, contention_until: float = 0.0) -> None:
        super().__init__(op_id, key)
        self.change = change
        self.attempts_left = attempts
        #: Until then a round lost to a higher ballot does not use up an attempt.
        self.contention_until = contention_until
        self.lost_rounds = 0
        self.phase = "locate"
        self.ballot = ZERO
        self.highest_seen = 0
        self.candidates: list[Contact] = []  # the N closest that answered the search (and self)
        self.closest_silent = False  # one of the N closest met did not answer
        self.group: list[Contact] | None = None
        self.asked: set[int] = set()
        self.promises: dict[int, Promise] = {}
        self.accepted: set[int] = set()
        self.refused: set[int] = set()
        self.already: Item | None = None
        self.proposal: Item | None = None
        self.proposal_ok = False
        #: Requests of the current attempt: answers to an earlier ballot must not count for this one.
        self.current: set[int] = set()
        self.ok = False
        self.item: Item | None = None
        self.reason = ""
        self.outbid = False  # an acceptor refused this round's accept: a higher ballot was promised
        #: A read's first attempt only looks (see the module docstring).
        self.peeking = change.kind == "read"

    def on_sent(self, rpc_id: int) -> None:
        self.current.add(rpc_id)

    # -- locate: the search found the key's closest nodes
    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        self.highest_seen = max(self.highest_seen, msg.sequence)

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        size = p.config.quorum_replicas
        closest = search.closest_seen(size, p.contact)
        self.closest_silent = not all(answered for _, answered in closest)
        holders = [c for c in search.ranked() if search.replies[c.node_id].has]
        self.candidates = [c for c, answered in closest if answered]
        for contact in holders:
            if contact not in self.candidates:
                self.candidates.append(contact)
        self._prepare(p, now)

    # -- phase 1
    def _prepare(self, p: Persistence, now: float) -> None:
        self.phase = "prepare"
        self.promises.clear()
        self.accepted.clear()
        self.refused.clear()
        self.outbid = False
        self.asked.clear()
        self.current.clear()
        if self.peeking:
            self.ballot = ZERO  # promised by no one: the acceptors only tell what they hold
        else:
            self.ballot = Ballot(self.highest_seen + 1, p.node_id, p.rng.getrandbits(32))
            self.highest_seen += 1
        targets = self.group if self.group is not None else self.candidates
        for contact in targets:
            self._ask_promise(p, contact, now)
        self._evaluate(p, now)

    def _ask_promise(self, p: Persistence, contact: Contact, now: float) -> None:
        if contact.node_id in self.asked:
            return
        self.asked.add(contact.node_id)
        if contact.node_id == p.node_id:
            self.promises[p.node_id] = p._acceptor_prepare(self.key, self.ballot, 0, p.node_id, now)
        else:
            p._request(p._fresh(contact), Prepare(0, p.node_id, self.key, self.ballot), self, now)

    def on_reply(self, p: Persistence, rpc: Rpc, msg: Any, now: float) -> None:
        if rpc.rpc_id not in self.current:
            return  # an answer to an earlier attempt's ballot
        if isinstance(msg, Promise) and self.phase == "prepare":
            if msg.item is not None and check_record(self.key, msg.item, p.config.max_record_bytes) is not None:
                p.dropped["bad_promise"] += 1
                return
            if msg.item is not None and check_group(msg.group) is not None:
                p.dropped["bad_promise"] += 1
                return
            self.promises[msg.sender] = msg
            self._evaluate(p, now)
        elif isinstance(msg, Accepted) and self.phase == "accept":
            self.highest_seen = max(self.highest_seen, msg.promised.counter)
            (self.accepted if msg.ok else self.refused).add(msg.sender)
            # outbid only when a higher ballot was promised: an acceptor that refuses the value
            # itself (a writer it does not admit) is no contention to wait out
            self.outbid = self.outbid or (not msg.ok and msg.promised > self.ballot)
            self._evaluate(p, now)

    def on_timeout(self, p: Persistence, rpc: Rpc, now: float) -> None:
        if rpc.rpc_id not in self.current:
            return
        if (rpc.kind is Prepare and self.phase == "prepare") or (rpc.kind is Accept and self.phase == "accept"):
            self.refused.add(rpc.contact.node_id)
            self._evaluate(p, now)

    def _evaluate(self, p: Persistence, now: float) -> None:
        if self.phase == "prepare":
            self._evaluate_promises(p, now)
        elif self.phase == "accept":
            assert self.group is not None
            members = {c.node_id for c in self.group}
            need = majority(len(self.group))
            if len(self.accepted & members) >= need:
                self.ok, self.item = self.proposal_ok, self.proposal
                p._finish(self, now)
            elif len(self.refused & members) > len(self.group) - need:
                self._retry(p, now, "acceptors refused or did not answer", outbid=self.outbid)

    def _evaluate_promises(self, p: Persistence, now: float) -> None:
        for promise in self.promises.values():
            self.highest_seen = max(self.highest_seen, promise.promised.counter)
        with_value = [pr for pr in self.promises.values() if pr.accepted != ZERO and pr.item is not None]
        if self.group is None and with_value:
            self.group = list(max(with_value, key=lambda pr: pr.accepted).group)
            for contact in self.group:  # group members the search did not reach
                self._ask_promise(p, contact, now)
        if self.peeking:
            self._evaluate_peek(p, with_value, now)
            return
        if self.group is None:
            waiting = [c for c in self.candidates if c.node_id not in self.promises and c.node_id not in self.refused]
            if waiting:
                return
            if self.closest_silent or any(c.node_id in self.refused for c in self.candidates):
                self._retry(p, now, "cannot reach the nodes closest to the key")
                return
            if self.change.kind == "read" or (self.change.kind == "cas" and self.change.expected_version != 0):
                self._decide_without_value(p, now)
                return
            self.group = self.candidates[: p.config.quorum_replicas]
        members = {c.node_id for c in self.group}
        granted = [pr for sender, pr in self.promises.items() if sender in members and pr.ok]
        refused = {sender for sender, pr in self.promises.items() if sender in members and not pr.ok}
        refused |= self.refused & members
        need = majority(len(self.group))
        if len(granted) >= need:
            self._accept(p, granted, now)
        elif len(refused) > len(self.group) - need:
            outbid = any(not pr.ok and pr.promised > self.ballot for sender, pr in self.promises.items()
                         if sender in members)
            self._retry(p, now, "no majority of the group promised" + self._refusals(), outbid=outbid)

    def _evaluate_peek(self, p: Persistence, with_value: list[Promise], now: float) -> None:
        """A read's look at the group: done when a majority agree, else a full round."""
        if self.group is None:
            waiting = [c for c in self.candidates if c.node_id not in self.promises and c.node_id not in self.refused]
            if waiting:
                return
            if not self.closest_silent and not self.refused and self.candidates:
                self.ok, self.item = True, None  # every one of the N closest answered: none holds a value
                p._finish(self, now)
                return
        else:
            members = {c.node_id for c in self.group}
            need = majority(len(self.group))
            latest = max((pr for pr in with_value if pr.sender in members), key=lambda pr: pr.accepted, default=None)
            if latest is not None:
                agreeing = [pr for pr in with_value if pr.sender in members and pr.accepted == latest.accepted
                            and pr.item == latest.item]
                if len(agreeing) >= need:
                    self.ok, self.item = True, latest.item
                    p.counters["quorum_reads_peeked"] += 1
                    p._finish(self, now)
                    return
            heard = (set(self.promises) | self.refused) & members
            if len(heard) < len(members):
                return
        self.peeking = False  # no agreement to read off: a full round settles it
        self._prepare(p, now)

    def _decide_without_value(self, p: Persistence, now: float) -> None:
        """Every one of the N closest answered and none holds a value: the key is empty."""
        granted = [pr for pr in self.promises.values() if pr.ok]
        if len(granted) < majority(max(1, len(self.candidates[: p.config.quorum_replicas]))):
            self._retry(p, now, "no majority of the closest nodes promised" + self._refusals())
            return
        self.ok, self.item = self.change.kind == "read", None
        if not self.ok:
            self.reason = f"version mismatch: expected {self.change.expected_version}, found 0"
        p._finish(self, now)

    def _refusals(self) -> str:
        """The reasons acceptors gave for refusing this round's promises, as a suffix."""
        reasons = sorted({pr.reason for pr in self.promises.values() if not pr.ok and pr.reason})
        return f" ({'; '.join(reasons)})" if reasons else ""

    # -- phase 2
    def _accept(self, p: Persistence, granted: list[Promise], now: float) -> None:
        assert self.group is not None
        current_promise = max(granted, key=lambda pr: pr.accepted)
        current = current_promise.item if current_promise.accepted != ZERO else None
        proposal, ok, reason = self.change.apply(current, self.already)
        self.proposal_ok, self.reason = ok, reason
        if proposal is None:  # nothing to make durable: the key is empty
            self.ok, self.item = ok, None
            p._finish(self, now)
            return
        if self.change.kind != "read" and ok and proposal != current:
            self.already = proposal
        self.proposal = proposal
        self.phase = "accept"
        group = list(self.group)
        # this node as an acceptor admits what its peers would: a service state version by a
        # writer it does not trust is refused here too (not accepted alone, which would leave
        # the group a value at the highest ballot that no majority will take)
        refused_here = is_service_state(proposal.name) and service_state_refusal(proposal, p.trusts) is not None
        for contact in group:
            if contact.node_id == p.node_id:
                if not refused_here and p._acceptor_accept(self.key, self.ballot, proposal, group, 0, now).ok:
                    self.accepted.add(p.node_id)
                else:
                    self.refused.add(p.node_id)
            else:
                p._request(p._fresh(contact), Accept(0, p.node_id, self.key, self.ballot, proposal, group), self, now)
        self._evaluate(p, now)

    def _retry(self, p: Persistence, now: float, reason: str, *, outbid: bool = False) -> None:
        """Try again after a random wait. A round another proposer outbid is contention, not
        failure: it is retried until ``contention_until``, with a wait drawn from zero up to a
        bound that doubles with each lost round (full jitter), so colliding writers spread out."""
        c = p.config
        if outbid and now < self.contention_until:
            self.lost_rounds += 1
            self.phase = "backoff"
            bound = min(c.quorum_backoff_max_s, c.quorum_backoff_s * 2 ** min(self.lost_rounds, 16))
            p.set_timer(("op", self.op_id), now + p.rng.uniform(0.0, bound))
            return
        self.attempts_left -= 1
        if self.attempts_left <= 0:
            self.ok, self.item, self.reason = False, None, f"unavailable: {reason}"
            p._finish(self, now)
            return
        self.phase = "backoff"
        tries = c.quorum_attempts - self.attempts_left
        p.set_timer(("op", self.op_id), now + p.rng.uniform(0.5, 1.5) * c.quorum_backoff_s * 2 ** tries)

    def on_timer(self, p: Persistence, now: float) -> None:
        if self.phase != "backoff":
            return
        if self.group is None:  # search again: the closest nodes may have come back
            self.phase = "locate"
            p._search(self, KIND_QUORUM, False, p.config.quorum_replicas, now)
        else:
            self._prepare(p, now)


class QuorumAcceptor:
    """The acceptor of quorum keys in the :class:`~p2pdeploy.collective.persistence.Persistence` layer.

    Its state is durable before any answer leaves, and bounded: a ``Prepare`` of a key this
    node holds nothing for creates a row that holds only a promise, and anyone can send one.
    Such rows (no accepted value) are counted per proposer (the ballot's node, which must be
    the sender) and in all; beyond ``promises_per_sender`` for one sender or ``max_promises``
    in all, a ``Prepare`` of a new key is refused with the reason (counted,
    ``promises_refused``) and writes nothing. This node's own rounds are not limited. With
    every repair round, a promise-only row last written ``promise_grace_s`` ago (counted from
    this node's start at the latest) is forgotten (``promises_forgotten``). A peek (ballot
    zero) is promised by no one and writes nothing.

    Why forgetting keeps CASPaxos safe. Paxos needs an acceptor's promise on a key never to go
    down. Before it forgets any promise, the acceptor raises its *promise floor* (durable, one
    ballot for the whole node) to the highest promise it forgets, and it answers every key it
    has no row for as if it had promised the floor: it accepts no ballot below it, reports the
    floor's counter to the holder search (so a proposer's first ballot on a new key is above
    it) and refuses a lower ``Prepare`` as outbid. So a key's promise here never decreases,
    whether its row is kept or forgotten, and no timing assumption is needed. Time matters for
    progress only: a round whose promise was forgotten under it may have its Accept refused
    (below a floor raised by another key) and tries again with a higher ballot; the grace, at
    least twice ``quorum_contention_s`` (600 s against rounds of seconds), keeps this off any
    round still running. Forgetting the promise alone, without the floor, would not be safe: a
    first write cut short leaves its value with one member and promises with the others; once
    those are forgotten, a proposer that does not reach that member (down, or no longer among
    the closest) could have a lower ballot chosen, which the stale value's higher ballot would
    later override.

    The accepted value of a writer this node does not trust is kept within the quotas of
    :mod:`~p2pdeploy.collective.persistence_admission` and collected ``stranger_quorum_grace_s``
    after this node last promised or accepted on the key (its promise raises the floor as
    above). Its group members collect it about together; until they all have, a read may still
    find it.
    """

    store: DurableStore
    node_id: int
    config: PersistenceConfig
    counters: Counter[str]
    _started_wall: float
    wall: Callable[[float], float]
    trusts: Callable[[bytes], bool]
    #: What this node promises every quorum key it holds no state for (see above).
    promise_floor: Ballot
    #: Promise-only rows per proposer; None: count afresh from the store when next needed.
    _promise_only: Counter[int] | None
    _promise_only_total: int

    def _acceptor_prepare(self, key: int, ballot: Ballot, rpc_id: int, sender: int, now: float) -> Promise:
        state = self.store.read_acceptor(key)
        current = state or AcceptorState(key, self.promise_floor)
        ok, new = on_prepare(current, ballot)
        if ok and state is None and sender != self.node_id:
            refusal = self._promise_refusal(sender)
            if refusal is not None:  # not outbid: the promise reported is not above the ballot
                self.counters["promises_refused"] += 1
                return Promise(rpc_id, self.node_id, False, current.promised, ZERO, None, [], refusal)
        if ok and new != current:
            self.store.write_acceptor(new, since=self.wall(now))  # durable before the promise leaves
            self._tally(state, new)
        return Promise(rpc_id, self.node_id, ok, new.promised, new.accepted, new.item, list(new.group))

    def _acceptor_accept(self, key: int, ballot: Ballot, item: Item, group: list[Contact], rpc_id: int,
                         now: float) -> Accepted:
        state = self.store.read_acceptor(key)
        ok, new = on_accept(state or AcceptorState(key, self.promise_floor), ballot, item, group)
        if ok:
            self.store.write_acceptor(new, since=self.wall(now))
            self._tally(state, new)
            if state is None or state.item != item:
                self.emit(QuorumValueAccepted(key, item, list(group)))
        return Accepted(rpc_id, self.node_id, ok, new.promised)

    def _promise_refusal(self, sender: int) -> str | None:
        """Why a promise on a key this node holds nothing for may not be given to ``sender``."""
        held = self._promises_held()
        c = self.config
        if held[sender] >= c.promises_per_sender:
            return (f"this node keeps at most {c.promises_per_sender} promises per sender on keys without a "
                    f"value ({held[sender]} held); they are forgotten {c.promise_grace_s:g} s after they were given")
        if self._promise_only_total >= c.max_promises:
            return (f"this node keeps at most {c.max_promises} promises on keys without a value, and holds "
                    f"as many; they are forgotten {c.promise_grace_s:g} s after they were given")
        return None

    def _promises_held(self) -> Counter[int]:
        if self._promise_only is None:
            held: Counter[int] = Counter()
            for state in map(self.store.read_acceptor, self.store.acceptor_keys()):
                if state is not None and not state.has_value:
                    held[state.promised.node] += 1
            self._promise_only, self._promise_only_total = held, sum(held.values())
        return self._promise_only

    def _tally(self, old: AcceptorState | None, new: AcceptorState) -> None:
        """Count the change from ``old`` to ``new`` in the promise-only rows per proposer."""
        held = self._promise_only
        if held is None:
            return
        if old is not None and not old.has_value:
            held[old.promised.node] -= 1
            self._promise_only_total -= 1
            if held[old.promised.node] <= 0:
                del held[old.promised.node]
        if not new.has_value:
            held[new.promised.node] += 1
            self._promise_only_total += 1

    def collect_acceptor_state(self, now: float) -> None:
        """Forget the promises no value followed within ``promise_grace_s``, and collect the
        values of untrusted writers unwritten for ``stranger_quorum_grace_s`` (see above)."""
        c = self.config
        wall = self.wall(now)
        gone: list[tuple[AcceptorState, str]] = []
        for key, since in self.store.acceptor_times().items():
            age = wall - max(since, self._started_wall)
            if age < c.promise_grace_s:
                continue
            state = self.store.read_acceptor(key)
            if state is None:
                continue
            if not state.has_value:
                gone.append((state, "promises_forgotten"))
            elif age >= c.stranger_quorum_grace_s and state.item is not None and \
                    not self.trusts(state.item.public_key):
                gone.append((state, "quorum_records_collected"))
        floor = max([self.promise_floor, *(state.promised for state, _ in gone)])
        if floor != self.promise_floor:
            self.store.write_promise_floor(floor)  # durable before any promise is forgotten
            self.promise_floor = floor
        for state, counter in gone:
            self.store.delete_acceptor(state.key)
            self.counters[counter] += 1
        self._promise_only = None
