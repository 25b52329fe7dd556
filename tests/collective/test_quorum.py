"""Quorum records (CASPaxos on the key's group): acceptor rules, reads, writes, compare-and-set,
and a stateful test with crashes and partitions that checks what the issue promises:
an acknowledged write is never lost, and a read never returns a value older than one
acknowledged before the read began.

Assumptions (``records.py`` documents them): acceptors keep their state across a crash (the
simulated disk survives); the group is fixed at the first write; no node joins closer to a key.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from p2pdeploy.collective.persistence import (
    Accept,
    FindHolders,
    Persistence,
    PersistenceConfig,
    Prepare,
    Promise,
    QuorumFinished,
)
from p2pdeploy.collective.persistence_messages import KIND_QUORUM
from p2pdeploy.collective.records import ZERO, AcceptorState, Ballot, Change, majority, on_accept, on_prepare
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import record_key, sign_record
from tests.simnet import StorageNet

WRITER = Identity.from_seed(bytes(range(2, 34)))
CONFIG = PersistenceConfig(rpc_timeout_s=1.0, quorum_attempts=4, quorum_backoff_s=0.2)

# -- the acceptor's rules --------------------------------------------------------------------

ballots = st.builds(Ballot, st.integers(0, 5), st.integers(0, 3), st.integers(0, 3))


@given(st.lists(st.tuples(st.booleans(), ballots), max_size=12))
def test_an_acceptor_never_goes_back_on_a_promise(steps):
    key, item = sign_record(WRITER, b"k", b"v", 1)
    state = AcceptorState(key)
    group = [Contact(1, 1)]
    for is_accept, ballot in steps:
        before = state
        if is_accept:
            ok, state = on_accept(state, ballot, item, group)
            assert ok == (ballot >= before.promised and ballot != ZERO)
            if ok:
                assert state.accepted == state.promised == ballot and state.item == item
        else:
            ok, state = on_prepare(state, ballot)
            assert ok == (ballot >= before.promised and ballot != ZERO)
        assert state.promised >= before.promised
        assert state.accepted >= before.accepted or state.accepted == ballot
        if not ok:
            assert state == before


def test_a_change_applies_once_and_cas_checks_the_version():
    _, v1 = sign_record(WRITER, b"k", b"one", 1)
    put = Change("put", WRITER, b"k", b"two")
    new, ok, _ = put.apply(v1, None)
    assert ok and new.sequence == 2 and new.value == b"two"
    assert put.apply(new, already=new) == (new, True, "")  # a retry that finds itself done
    cas = Change("cas", WRITER, b"k", b"three", expected_version=1)
    assert cas.apply(new, None) == (new, False, "version mismatch: expected 1, found 2")
    assert Change("cas", WRITER, b"k", b"first", expected_version=0).apply(None, None)[0].sequence == 1
    assert Change("read").apply(v1, None) == (v1, True, "")
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


# -- reads and writes on a network -----------------------------------------------------------


def op(net: StorageNet, address: int, start) -> QuorumFinished:
    query = net.call(address, start)
    return net.result(address, query, QuorumFinished)


def test_a_write_is_read_back_from_any_node_with_its_version():
    net = StorageNet(9, seed=1, config=CONFIG)
    key = record_key(WRITER.public_key, b"config")
    assert op(net, 0, lambda p, now: p.quorum_read(key, now)) == QuorumFinished(1, key, True, None)
    written = op(net, 0, lambda p, now: p.quorum_put(WRITER, b"config", b"a", now))
    assert written.ok and written.version == 1
    for address in range(9):
        read = op(net, address, lambda p, now: p.quorum_read(key, now))
        assert read.ok and read.item == written.item
    again = op(net, 5, lambda p, now: p.quorum_put(WRITER, b"config", b"b", now))
    assert again.ok and again.version == 2


def test_compare_and_set_succeeds_once_per_version():
    net = StorageNet(9, seed=2, config=CONFIG)
    name = b"leader"
    first = op(net, 1, lambda p, now: p.quorum_cas(WRITER, name, 0, b"node-1", now))
    assert first.ok and first.version == 1
    late = op(net, 2, lambda p, now: p.quorum_cas(WRITER, name, 0, b"node-2", now))
    assert not late.ok and late.version == 1 and late.item.value == b"node-1"
    assert "version mismatch" in late.reason
    second = op(net, 2, lambda p, now: p.quorum_cas(WRITER, name, 1, b"node-2", now))
    assert second.ok and second.version == 2
    absent = op(net, 3, lambda p, now: p.quorum_cas(WRITER, b"nothing", 4, b"x", now))
    assert not absent.ok and absent.item is None and "version mismatch" in absent.reason


def test_concurrent_compare_and_set_on_one_version_has_one_winner():
    net = StorageNet(9, seed=3, config=CONFIG)
    queries = {a: net.call(a, lambda p, now, a=a: p.quorum_cas(WRITER, b"lock", 0, b"%d" % a, now))
               for a in range(6)}
    results = {a: net.result(a, q, QuorumFinished, timeout_s=120) for a, q in queries.items()}
    winners = [a for a, r in results.items() if r.ok]
    assert len(winners) <= 1
    final = op(net, 7, lambda p, now: p.quorum_read(record_key(WRITER.public_key, b"lock"), now))
    if winners:
        assert final.version == 1 and final.item.value == b"%d" % winners[0]


def test_the_group_answers_while_a_minority_is_down_and_a_write_survives_a_majority_crash():
    net = StorageNet(9, seed=4, config=CONFIG)
    key = record_key(WRITER.public_key, b"k")
    op(net, 0, lambda p, now: p.quorum_put(WRITER, b"k", b"v1", now))
    group = net.closest(key, 3)
    reader = next(a for a in range(9) if a not in group)
    net.crash(group[0])
    assert op(net, reader, lambda p, now: p.quorum_put(WRITER, b"k", b"v2", now)).ok
    net.crash(group[1])
    assert not op(net, reader, lambda p, now: p.quorum_read(key, now)).ok  # unavailable, not wrong
    net.restart(group[0])
    read = op(net, reader, lambda p, now: p.quorum_read(key, now))
    assert read.ok and read.item.value == b"v2" and read.version == 2


def test_a_first_write_fails_rather_than_fork_when_a_closest_node_is_unreachable():
    net = StorageNet(9, seed=5, config=CONFIG)
    key = record_key(WRITER.public_key, b"new")
    closest = net.closest(key, 1)[0]
    writer = next(a for a in range(9) if a != closest)
    net.partition([[closest]])
    failed = op(net, writer, lambda p, now: p.quorum_put(WRITER, b"new", b"v", now))
    assert not failed.ok and failed.reason.startswith("unavailable")
    net.heal()
    assert op(net, writer, lambda p, now: p.quorum_put(WRITER, b"new", b"v", now)).ok


def test_a_read_makes_a_value_it_returns_durable_on_a_majority_first():
    """A value accepted by one acceptor only (a write cut short) is written back before a read
    returns it, so a later read that does not reach that acceptor still sees it."""
    net = StorageNet(9, seed=6, config=CONFIG)
    key = record_key(WRITER.public_key, b"k")
    first = op(net, 0, lambda p, now: p.quorum_put(WRITER, b"k", b"v1", now))
    group = net.closest(key, 3)
    lone = group[0]
    state = net.stores[lone].read_acceptor(key)
    _, partial = sign_record(WRITER, b"k", b"v2", 2)
    ballot = Ballot(state.promised.counter + 1, net.node_id(lone), 1)
    net.stores[lone].write_acceptor(AcceptorState(key, ballot, ballot, partial, state.group))
    reader = next(a for a in range(9) if a not in group)
    seen = op(net, reader, lambda p, now: p.quorum_read(key, now))
    assert seen.version in (1, 2)
    if seen.version == 2:
        holders = [a for a in group if net.stores[a].read_acceptor(key).item == partial]
        assert len(holders) >= 2
        net.partition([[lone]])
        again = op(net, reader, lambda p, now: p.quorum_read(key, now))
        assert again.ok and again.item == partial
    else:
        assert seen.item == first.item


def test_reads_of_a_quiet_key_only_look_and_do_not_fight_each_other():
    """Many reads of one key at once: each peeks at the group (a prepare at ballot zero that no
    acceptor promises), sees a majority agree and returns; no acceptor's state changes. A full
    round for each read would have bumped the promises and made the reads refuse each other."""
    net = StorageNet(9, seed=7, config=CONFIG)
    key = record_key(WRITER.public_key, b"hot")
    written = op(net, 0, lambda p, now: p.quorum_put(WRITER, b"hot", b"v", now))
    group = net.closest(key, 3)
    before = {a: net.stores[a].read_acceptor(key) for a in group}
    queries = {a: net.call(a, lambda p, now: p.quorum_read(key, now)) for a in range(9)}
    results = [net.result(a, q, QuorumFinished) for a, q in queries.items()]
    assert all(r.ok and r.item == written.item for r in results)
    assert {a: net.stores[a].read_acceptor(key) for a in group} == before  # nothing promised, nothing written
    assert sum(net.layer(a, Persistence).counters["quorum_reads_peeked"] for a in range(9)) == 9


def test_a_read_during_a_write_in_progress_runs_a_full_round():
    """A record accepted by a minority only is not read off a peek: the full round decides."""
    net = StorageNet(9, seed=8, config=CONFIG)
    key = record_key(WRITER.public_key, b"k")
    op(net, 0, lambda p, now: p.quorum_put(WRITER, b"k", b"v1", now))
    lone = net.closest(key, 3)[0]
    state = net.stores[lone].read_acceptor(key)
    _, partial = sign_record(WRITER, b"k", b"v2", 2)
    ballot = Ballot(state.promised.counter + 1, net.node_id(lone), 1)
    net.stores[lone].write_acceptor(AcceptorState(key, ballot, ballot, partial, state.group))
    reader = 8
    read = op(net, reader, lambda p, now: p.quorum_read(key, now))
    assert read.ok and net.layer(reader, Persistence).counters["quorum_reads_peeked"] == 0


# -- a stranger's prepares -------------------------------------------------------------------

STRANGER = 8  # an address in a net of 9 whose ids and messages are the attacker's


def flood_prepares(net: StorageNet, rng: random.Random, count: int, *, rotate_ids: bool = False) -> int:
    """``count`` Prepares of random keys from the stranger to every other node, as an attacker's
    own code sends them (under one id, or a new random id each); the promises refused."""
    refused = 0
    for n in range(count):
        sender = rng.getrandbits(160) if rotate_ids else net.node_id(STRANGER)
        prepare = Prepare(n + 1, sender, rng.getrandbits(160), Ballot(1, sender, n))
        for address in range(STRANGER):
            layer = net.persistence(address)
            layer.receive(STRANGER, prepare, net.now)
            refused += sum(1 for _, msg in layer.messages_to_send() if isinstance(msg, Promise) and not msg.ok)
    return refused


def promise_only_rows(net: StorageNet, address: int) -> int:
    store = net.stores[address]
    return sum(1 for key in store.acceptor_keys() if not store.read_acceptor(key).has_value)


def test_a_strangers_prepares_of_random_keys_leave_every_acceptor_store_bounded():
    """10,000 Prepares of random keys from one sender once made 10,000 durable rows on every
    node, forever; now each node keeps the sender's promises within its quota and forgets them
    after the grace, while puts, compare-and-sets and reads go on."""
    net = StorageNet(9, seed=31, config=CONFIG)
    rng = random.Random(31)
    key = record_key(WRITER.public_key, b"k")
    assert op(net, 0, lambda p, now: p.quorum_put(WRITER, b"k", b"v1", now)).ok
    refused = flood_prepares(net, rng, 5_000)
    assert op(net, 1, lambda p, now: p.quorum_cas(WRITER, b"k", 1, b"v2", now)).ok
    assert op(net, 2, lambda p, now: p.quorum_put(WRITER, b"during", b"d", now)).ok
    refused += flood_prepares(net, rng, 5_000)
    for address in range(STRANGER):
        assert promise_only_rows(net, address) <= 256 + 2, address  # the sender's quota, and the legit rounds'
    assert refused >= STRANGER * (10_000 - 256)
    read = op(net, 3, lambda p, now: p.quorum_read(key, now))
    assert read.ok and read.item.value == b"v2" and read.version == 2
    net.run_for(600.0 + 2 * CONFIG.repair_interval_s)  # past the grace: the promises are forgotten
    assert all(promise_only_rows(net, a) == 0 for a in range(STRANGER))
    assert op(net, 4, lambda p, now: p.quorum_cas(WRITER, b"k", 2, b"v3", now)).ok
    assert op(net, 5, lambda p, now: p.quorum_read(key, now)).item.value == b"v3"
    assert op(net, 6, lambda p, now: p.quorum_read(record_key(WRITER.public_key, b"during"), now)).item.value == b"d"
    assert op(net, 7, lambda p, now: p.quorum_put(WRITER, b"after", b"a", now)).ok


def test_prepares_under_ever_new_ids_meet_the_limit_of_all_promises():
    """Ids cost nothing to make: the per-sender quota alone does not bound the rows, the limit
    on all promises does. Keys that hold a value go on being read and written meanwhile."""
    net = StorageNet(9, seed=32, config=CONFIG)
    key = record_key(WRITER.public_key, b"k")
    assert op(net, 0, lambda p, now: p.quorum_put(WRITER, b"k", b"v1", now)).ok
    flood_prepares(net, random.Random(32), 5_000, rotate_ids=True)
    for address in range(STRANGER):
        assert promise_only_rows(net, address) <= 4096, address
    assert net.persistence(0).counters["promises_refused"] >= 5_000 - 4096
    assert op(net, 1, lambda p, now: p.quorum_cas(WRITER, b"k", 1, b"v2", now)).ok
    assert op(net, 2, lambda p, now: p.quorum_read(key, now)).item.value == b"v2"


def test_a_refused_promise_says_why_and_is_not_taken_for_contention():
    """A group whose acceptors hold all the promises they keep refuses a new key with the
    reason; the proposer gives up after its attempts instead of waiting out the contention."""
    config = dataclasses.replace(CONFIG, max_promises=0)
    net = StorageNet(5, seed=33, config=config)
    key = record_key(WRITER.public_key, b"new")
    writer = next(a for a in range(5) if a not in net.closest(key, 3))
    started = net.now
    failed = op(net, writer, lambda p, now: p.quorum_put(WRITER, b"new", b"v", now))
    assert not failed.ok and "promises on keys without a value" in failed.reason, failed.reason
    assert net.now - started < config.quorum_contention_s
    assert all(net.stores[a].read_acceptor(key) is None for a in range(5) if a != writer)


def test_a_promise_is_kept_through_the_grace_and_a_ballot_must_be_its_senders():
    net = StorageNet(3, seed=34, config=CONFIG)
    layer, sender = net.persistence(0), net.node_id(1)
    layer.receive(1, Prepare(1, sender, 77, Ballot(5, net.node_id(2))), net.now)  # another node's ballot
    assert layer.dropped["bad_prepare"] == 1 and net.stores[0].read_acceptor(77) is None
    layer.receive(1, Prepare(2, sender, 77, Ballot(5, sender)), net.now)
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Promise)] == [True]
    net.run_for(CONFIG.promise_grace_s - 1.0)
    assert net.stores[0].read_acceptor(77).promised == Ballot(5, sender)
    layer.receive(1, Prepare(3, sender, 77, Ballot(4, sender)), net.now)  # a lower ballot: still refused
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Promise)] == [False]
    net.run_for(2 * CONFIG.repair_interval_s + 1.0)
    assert net.stores[0].read_acceptor(77) is None and layer.counters["promises_forgotten"] == 1


def test_a_forgotten_promise_still_holds_through_the_promise_floor():
    """A first write cut short: its value reached one member, the others only promised. Once
    they forget those promises, a lower ballot must still be refused there (else it could be
    chosen, and the stale value's higher ballot override it later); the node promises every
    key it holds nothing for its floor, the highest promise it forgot, also after a restart."""
    net = StorageNet(3, seed=36, config=CONFIG)
    layer, sender = net.persistence(0), net.node_id(1)
    key, item = sign_record(WRITER, b"k", b"v", 1)
    layer.receive(1, Prepare(1, sender, key, Ballot(10, sender)), net.now)
    net.run_for(CONFIG.promise_grace_s + 2 * CONFIG.repair_interval_s)
    assert net.stores[0].read_acceptor(key) is None and net.stores[0].read_promise_floor() == Ballot(10, sender)
    net.crash(0)
    net.restart(0)
    layer = net.persistence(0)
    layer.receive(1, Prepare(2, sender, key, Ballot(9, sender)), net.now)
    layer.receive(1, Accept(3, sender, key, Ballot(9, sender), item, [Contact(net.node_id(0), 0)]), net.now)
    layer.receive(1, FindHolders(4, sender, key, KIND_QUORUM, False, 3), net.now)
    answers = [msg for _, msg in layer.messages_to_send()]
    promise, accepted, holders = answers
    assert not promise.ok and promise.promised == Ballot(10, sender) and not accepted.ok
    assert holders.sequence == 10  # a proposer's first ballot on a new key is above the floor
    assert net.stores[0].read_acceptor(key) is None
    assert op(net, 2, lambda p, now: p.quorum_put(WRITER, b"k", b"w", now)).ok


def test_a_strangers_quorum_record_is_collected_a_grace_after_it_was_last_written():
    config = dataclasses.replace(CONFIG, stranger_quorum_grace_s=3600.0)
    stranger = Identity.from_seed(bytes(range(7, 39)))
    net = StorageNet(5, seed=35, config=config, trusting=frozenset({WRITER.public_key}))
    theirs = op(net, 0, lambda p, now: p.quorum_put(stranger, b"s", b"x", now))
    ours = op(net, 0, lambda p, now: p.quorum_put(WRITER, b"t", b"y", now))
    assert theirs.ok and ours.ok
    net.run_for(3600.0 + 2 * config.repair_interval_s)
    assert all(net.stores[a].read_acceptor(theirs.key) is None for a in range(5))
    assert len([a for a in range(5) if net.stores[a].read_acceptor(ours.key) is not None]) == 3
    assert op(net, 1, lambda p, now: p.quorum_read(theirs.key, now)).item is None


# -- the stateful test -----------------------------------------------------------------------

NODES = 7
NAMES = (b"alpha", b"beta")


@dataclass
class Operation:
    kind: str  # read | put | cas
    address: int
    query: int
    name: bytes
    value: bytes
    expected: int | None
    started: float
    ended: float | None = None
    event: QuorumFinished | None = None


class QuorumRegisters(RuleBasedStateMachine):
    """Reads, puts and compare-and-sets from random nodes while nodes crash, restart and the
    network splits; each completed operation is checked against the history so far."""

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        self.net = StorageNet(NODES, seed=seed, config=CONFIG)
        self.ops: list[Operation] = []
        self.seen = 0
        self.counter = 0
        self.keys = {name: record_key(WRITER.public_key, name) for name in NAMES}
        #: (name, version) -> value, from every acknowledged write and every read
        self.values: dict[tuple[bytes, int], bytes] = {}
        self.proposed: dict[bytes, set[bytes]] = {name: set() for name in NAMES}

    def _live(self, index: int) -> int | None:
        live = [a for a in range(NODES) if self.net.up(a)]
        return live[index % len(live)] if live else None

    # -- operations
    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES))
    def read(self, node, name):
        address = self._live(node)
        if address is None:
            return
        key = self.keys[name]
        query = self.net.call(address, lambda p, now: p.quorum_read(key, now))
        self.ops.append(Operation("read", address, query, name, b"", None, self.net.now))

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES), cas=st.booleans(),
          offset=st.integers(-1, 1))
    def write(self, node, name, cas, offset):
        address = self._live(node)
        if address is None:
            return
        # compare-and-set on the newest version seen so far, or just beside it
        seen = [version for (n, version) in self.values if n == name]
        expected = max(0, max(seen, default=0) + offset)
        self.counter += 1
        value = b"v%d" % self.counter
        self.proposed[name].add(value)
        if cas:
            query = self.net.call(address, lambda p, now: p.quorum_cas(WRITER, name, expected, value, now))
        else:
            query = self.net.call(address, lambda p, now: p.quorum_put(WRITER, name, value, now))
        self.ops.append(Operation("cas" if cas else "put", address, query, name, value,
                                  expected if cas else None, self.net.now))

    # -- faults
    @precondition(lambda self: sum(self.net.up(a) for a in range(NODES)) > 3)
    @rule(node=st.integers(0, NODES - 1))
    def crash(self, node):
        self.net.crash(node)
        for operation in self.ops:  # the node's own operations die with it: never acknowledged
            if operation.address == node and operation.ended is None:
                operation.ended = -1.0

    @rule(node=st.integers(0, NODES - 1))
    def restart(self, node):
        self.net.restart(node)

    @rule(members=st.sets(st.integers(0, NODES - 1), min_size=1, max_size=NODES - 1))
    def partition(self, members):
        self.net.partition([members])

    @rule()
    def heal(self):
        self.net.heal()

    @rule(seconds=st.sampled_from([0.05, 0.5, 2.0, 8.0]))
    def advance(self, seconds):
        self.net.run_for(seconds)
        self._collect()

    # -- checking
    def _collect(self) -> None:
        events = self.net.events
        by_query = {(op.address, op.query): op for op in self.ops if op.ended is None}
        while self.seen < len(events):
            address, event = events[self.seen]
            self.seen += 1
            if isinstance(event, QuorumFinished):
                operation = by_query.get((address, event.query_id))
                if operation is not None:
                    operation.ended, operation.event = self.net.now, event
                    self._check(operation)

    @staticmethod
    def _informative(operation: Operation) -> bool:
        """The operation saw the register: a read, an acknowledged write, or a cas refused on a version."""
        event = operation.event
        return event is not None and (event.ok or event.reason.startswith("version mismatch"))

    def _check(self, done: Operation) -> None:
        event = done.event
        assert event is not None
        name = done.name
        if event.item is not None:
            assert event.item.name == name
            assert event.item.value in self.proposed[name], "a value nobody wrote"
            previous = self.values.setdefault((name, event.version), event.item.value)
            assert previous == event.item.value, f"two values for version {event.version} of {name!r}"
        if not self._informative(done):
            return  # unavailable: it may or may not have taken effect, and tells nothing
        if done.kind != "read" and event.ok:
            assert event.item is not None and event.item.value == done.value
            if done.kind == "cas":
                assert event.version == done.expected + 1
        wrote = done.kind != "read" and event.ok
        for other in self.ops:
            if other is done or other.name != name or other.ended is None or other.ended < 0:
                continue
            if other.ended >= done.started or not self._informative(other):
                continue
            before = other.event.version
            # nothing acknowledged or read before this operation began may be newer than what it saw
            assert event.version >= before, (
                f"{done.kind} of {name!r} that began at {done.started} saw version {event.version}, "
                f"older than version {before} seen at {other.ended}")
            if wrote:
                assert event.version > before

    def teardown(self):
        if not hasattr(self, "net"):
            return
        net = self.net
        net.heal()
        for address in range(NODES):
            net.restart(address)
        net.run_for(60.0)
        self._collect()
        for name in NAMES:
            reader = 0
            query = net.call(reader, lambda p, now, name=name: p.quorum_read(self.keys[name], now))
            started = net.now
            final = net.result(reader, query, QuorumFinished, timeout_s=120)
            assert final.ok, final.reason
            self.ops.append(Operation("read", reader, query, name, b"", None, started, net.now, final))
            self._check(self.ops[-1])
            acked = [op.event.version for op in self.ops if op.name == name and op.kind != "read"
                     and op.event is not None and op.event.ok]
            assert final.version >= max(acked, default=0), "an acknowledged write was lost"


QuorumRegisters.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_quorum_registers_never_lose_acknowledged_writes = QuorumRegisters.TestCase


def test_the_stateful_checker_catches_a_lost_write():
    """The checker itself: a final read older than an acknowledged write must fail it."""
    machine = QuorumRegisters()
    machine.build(seed=1)
    name = NAMES[0]
    machine.proposed[name].update({b"v1", b"v2"})
    _, one = sign_record(WRITER, name, b"v1", 1)
    _, two = sign_record(WRITER, name, b"v2", 2)
    key = machine.keys[name]
    write = Operation("put", 0, 1, name, b"v2", None, 0.0, 1.0, QuorumFinished(1, key, True, two))
    machine.ops.append(write)
    machine._check(write)
    stale = Operation("read", 1, 2, name, b"", None, 2.0, 3.0, QuorumFinished(2, key, True, one))
    machine.ops.append(stale)
    with pytest.raises(AssertionError, match="older than version 2"):
        machine._check(stale)
