"""The prospector core on the simulator (tests/simnet.py): the tree converges to exact aggregates,
repairs itself, answers prospects with matching nodes only, and drops bad input."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy.collective import prospector as prospector_module
from p2pdeploy.collective.aggregation import Summary, TopEntry, attributes_to_wire
from p2pdeploy.collective.prospector import (
    AggregateAck,
    AggregateFinished,
    AggregateReply,
    AggregateRequest,
    AggregateUpdate,
    Candidate,
    ProspectFinished,
    Prospector,
    ProspectorConfig,
    ProspectReply,
    ProspectRequest,
    spread_pick,
)
from p2pdeploy.core import Stack
from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import ProcessSpec
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaSpec
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig, LookupFinished
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.description import DescriptionChanged, NodeDescription
from p2pdeploy.resource.requirements import ParseError, Requirement
from tests.simnet import SimNet

FAST = ProspectorConfig(update_interval_s=2.0, min_update_interval_s=0.2, expiry_s=5.0, ack_timeout_s=0.5,
                        rpc_timeout_s=0.5, root_timeout_s=1.0, suspect_s=30.0)
OSES = ("linux", "linux", "darwin", "freebsd")
OWNERS = ("alice", "bob", "carol", "dave")


def machine(rng: random.Random) -> dict:
    return {
        "cpu_free": rng.choice((0.5, 1, 2, 4)),
        "memory_free": rng.choice((1, 2, 4, 16)) << 30,
        "os": rng.choice(OSES),
        "owner": rng.choice(OWNERS),
        "region": rng.choice(("eu", "us", "ap")),
        "tags": frozenset(t for t in ("ssd", "gpu") if rng.random() < 0.3),
    }


class Community:
    """``size`` nodes with prefilled routing tables (``k`` contacts per bucket), each running a prospector."""

    def __init__(self, size: int, *, seed: int = 1, config: ProspectorConfig = FAST, k: int = 3) -> None:
        self.rng = random.Random(seed)
        self.attributes: list[dict] = []

        def layers(overlay: Kademlia, rng: random.Random) -> list:
            address = len(self.net.nodes)  # SimNet numbers nodes in the order it adds them
            attributes = machine(self.rng)
            self.attributes.append(attributes)
            return [Prospector(overlay, address, rng, config, attributes)]

        # small buckets: each node knows few others, so the tree has inner nodes, as at scale
        self.net = SimNet(layers, seed=seed, config=KademliaConfig(k=k, alpha=3, b=1))
        indices = [self.net.add() for _ in range(size)]
        order = random.Random(seed)
        for i in indices:  # each table gets k random members of each bucket's range (an oracle warm start)
            others = [j for j in indices if j != i]
            order.shuffle(others)
            for j in others:
                self.net.overlays[i].table.add(Contact(self.net.overlays[j].node_id, j))
        for index in self.net.nodes:
            self.net.call(index, lambda stack, now: stack.layer(Prospector).start(now))

    def p(self, index: int) -> Prospector:
        return self.net.layer(index, Prospector)

    def live(self) -> list[int]:
        return [i for i in self.net.nodes if i not in self.net.down]

    def root(self) -> int:
        key = FAST.key
        return min(self.live(), key=lambda i: self.net.overlays[i].node_id ^ key)

    def run(self, seconds: float) -> None:
        self.net.run(until=self.net.now + seconds)

    def ask(self, index: int, start) -> object:
        query = self.net.call(index, lambda stack, now: start(stack.layer(Prospector), now))
        for _ in range(200):
            self.run(0.1)
            done = [e for e in self.net.events_of(ProspectFinished, index) + self.net.events_of(AggregateFinished, index)
                    if e.query_id == query]
            if done:
                return done[-1]
        raise AssertionError("the query did not finish")

    def matching(self, requirement: str) -> set[int]:
        parsed = Requirement.parse(requirement)
        return {i for i in self.live() if parsed.evaluate(self.p(i).attributes)}


@pytest.fixture(scope="module")
def community() -> Community:
    community = Community(40)
    community.run(10.0)
    return community


# -- the tree -------------------------------------------------------------------------------


def test_count_and_sum_at_the_root_are_exact_after_convergence(community):
    root = community.p(community.root())
    assert root.is_root and root.parent is None
    summary = root.summary()
    assert summary.nodes == 40
    assert summary.numbers["memory_free"].total == sum(a["memory_free"] for a in community.attributes)
    assert summary.numbers["cpu_free"].high == max(a["cpu_free"] for a in community.attributes)
    assert summary.strings["os"].counts == {os: [a["os"] for a in community.attributes].count(os)
                                            for os in set(OSES) if any(a["os"] == os for a in community.attributes)}


def test_every_parent_is_closer_to_the_key_and_every_node_knows_the_root(community):
    key = FAST.key
    root_id = community.net.overlays[community.root()].node_id
    for index in community.net.nodes:
        p = community.p(index)
        if p.parent is not None:
            assert p.parent.node_id ^ key < p.node_id ^ key
            assert p.root is not None and p.root.node_id == root_id
            assert p.depth is not None and p.depth >= 1
    assert sum(1 for i in community.net.nodes if community.p(i).is_root) == 1


def test_aggregates_from_any_node_are_answered_by_the_root(community):
    attrs = community.attributes
    memory = [a["memory_free"] for a in attrs]
    expected = {
        (None, "count"): 40,
        ("memory_free", "sum"): sum(memory),
        ("memory_free", "min"): min(memory),
        ("memory_free", "max"): max(memory),
        ("memory_free", "avg"): sum(memory) / 40,
        ("tags", "count"): 40,
        ("nothing", "sum"): None,
    }
    for (attribute, fn), value in expected.items():
        event = community.ask(7, lambda p, now, a=attribute, f=fn: p.aggregate(a, f, now))
        assert event.ok and event.value == value, (attribute, fn)
        assert event.nodes == 40
    top = community.ask(11, lambda p, now: p.aggregate("memory_free", "top", now)).value
    assert [e.value for e in top] == sorted(memory, reverse=True)[:3]
    assert all(isinstance(e, TopEntry) for e in top)
    values = community.ask(3, lambda p, now: p.aggregate("os", "values", now)).value
    assert values == {os: [a["os"] for a in attrs].count(os) for os in {a["os"] for a in attrs}}
    root = community.root()
    here = community.ask(root, lambda p, now: p.aggregate(None, "count", now))
    assert here.value == 40 and here.messages == 0  # the root answers itself


# -- prospects ------------------------------------------------------------------------------


@pytest.mark.parametrize("requirement", [
    'os == "linux" and cpu_free >= 1',
    'memory_free >= 16G and not owner == "alice"',
    '"gpu" in tags or os == "freebsd"',
    'os == "windows"',
])
def test_a_prospect_returns_only_matching_nodes_and_n_of_them_when_they_exist(community, requirement):
    truth = community.matching(requirement)
    event = community.ask(5, lambda p, now: p.prospect(requirement, 4, now))
    got = {community.net.index_of(f.contact.node_id) for f in event.nodes}
    assert got <= truth
    assert len(got) == min(4, len(truth))
    assert all(f.attributes == community.p(community.net.index_of(f.contact.node_id)).attributes
               for f in event.nodes)
    if len(truth) < 4:
        assert event.exhausted


def test_a_prospect_prefers_nodes_of_different_owners(community):
    requirement = "cpu_free >= 0"
    event = community.ask(9, lambda p, now: p.prospect(requirement, 4, now))
    owners = {f.attributes["owner"] for f in event.nodes}
    available = {community.p(i).attributes["owner"] for i in community.matching(requirement)}
    assert len(owners) == min(4, len(available))


def test_a_prospect_costs_few_messages_when_matches_are_common(community):
    event = community.ask(13, lambda p, now: p.prospect('os == "linux"', 3, now))
    assert len(event.nodes) == 3
    assert event.messages <= 2 + 2 * 3 + 4  # the root, one visit per node returned, a little slack


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["cpu_free", "memory_free"]), st.sampled_from([">=", "<", "=="]),
                          st.sampled_from(["1", "2", "4G"])), min_size=1, max_size=2),
       st.sampled_from(['os == "linux"', 'os != "linux"', '"ssd" in tags', 'owner in {"bob", "carol"}', "true"]),
       st.integers(0, 39))
def test_prospect_matching_agrees_with_direct_evaluation_over_the_attributes(community, clauses, category, asker):
    requirement = " and ".join([f"{a} {op} {v}" for a, op, v in clauses] + [category])
    truth = community.matching(requirement)
    event = community.ask(asker, lambda p, now: p.prospect(requirement, 40, now))
    assert {community.net.index_of(f.contact.node_id) for f in event.nodes} == truth
    assert event.exhausted


def test_a_node_with_more_promising_subtrees_than_one_answer_holds_is_asked_again():
    tight = dataclasses.replace(FAST, max_subtrees=1, candidate_factor=1, max_visits=200)
    community = Community(40, seed=2, config=tight)
    community.run(10.0)
    for requirement in ('os == "linux"', '"ssd" in tags and os != "darwin"', "cpu_free >= 2"):
        event = community.ask(4, lambda p, now, r=requirement: p.prospect(r, 40, now))
        assert {community.net.index_of(f.contact.node_id) for f in event.nodes} == community.matching(requirement)
        assert event.exhausted


# -- repair ---------------------------------------------------------------------------------


def test_a_dead_subtree_disappears_and_its_members_reappear_under_new_parents():
    community = Community(30, seed=3)
    community.run(8.0)
    root = community.root()
    # crash the non-root node with the largest subtree
    victim = max((i for i in community.net.nodes if i != root), key=lambda i: community.p(i).summary().nodes)
    assert community.p(victim).summary().nodes > 1
    community.net.crash(victim)
    community.run(FAST.expiry_s + 2 * FAST.update_interval_s)
    summary = community.p(root).summary()
    assert summary.nodes == 29
    assert summary.numbers["memory_free"].total == sum(
        community.p(i).attributes["memory_free"] for i in community.live())


def test_orphans_are_not_counted_twice_while_their_dead_parents_entry_lingers():
    community = Community(40, seed=1)
    community.run(8.0)
    root = community.root()
    victim = max((i for i in community.net.nodes if community.p(i).depth == 1),
                 key=lambda i: community.p(i).summary().nodes)
    assert community.p(victim).summary().nodes > 2
    community.net.crash(victim)
    counts = []
    for _ in range(int(2 * FAST.expiry_s / 0.1)):
        community.run(0.1)
        counts.append(community.p(root).summary().nodes)
    # the dead node itself lingers until its entry expires; its subtree is never counted twice
    assert max(counts) <= 40
    assert counts[-1] == 39
    assert sum(community.p(i).counters["orphaned_sent"] for i in community.live()) >= 1


def test_when_the_root_dies_the_next_closest_node_takes_over_with_the_exact_count():
    community = Community(25, seed=4)
    community.run(8.0)
    old_root = community.root()
    community.net.crash(old_root)
    community.run(3 * FAST.update_interval_s + FAST.expiry_s)
    new_root = community.root()
    assert community.p(new_root).is_root
    assert community.p(new_root).summary().nodes == 24
    event = community.ask(community.live()[3], lambda p, now: p.aggregate(None, "count", now))
    assert event.value == 24


def test_the_lookups_a_root_makes_to_check_itself_end_inside_its_stack(community):
    root = community.root()
    lookups = community.p(root).counters["root_lookups"]
    assert lookups >= 1
    assert community.net.events_of(LookupFinished, root) == []  # the driver never sees them
    assert 1 <= community.net.nodes[root].consumed["LookupFinished"] <= lookups


def test_a_node_whose_next_hop_changes_detaches_so_nobody_is_counted_twice():
    community = Community(40, seed=5)
    community.run(6.0)
    key = FAST.key

    def closer_contacts(i: int) -> list[Contact]:
        own = community.net.overlays[i].node_id ^ key
        return [c for c in community.net.overlays[i].closest_known(key, 8) if c.node_id ^ key < own]

    # a node whose next hop disappears from its routing table (evicted), leaving another closer contact
    mover = next(i for i in sorted(community.net.nodes, key=lambda i: -community.p(i).summary().nodes)
                 if len(closer_contacts(i)) >= 2)
    old_parent = community.p(mover).parent
    assert old_parent == closer_contacts(mover)[0]
    community.net.overlays[mover].table.remove(old_parent.node_id)
    community.run(FAST.update_interval_s + 1.0)
    assert community.p(mover).parent == closer_contacts(mover)[0] != old_parent
    assert community.p(mover).node_id not in community.p(community.net.index_of(old_parent.node_id)).children
    assert community.p(community.root()).summary().nodes == 40


def test_changed_attributes_reach_the_root_within_the_rate_bound():
    community = Community(15, seed=6)
    community.run(6.0)
    leaf = next(i for i in community.net.nodes if not community.p(i).children)
    attrs = dict(community.p(leaf).attributes, memory_free=1 << 40)
    community.net.call(leaf, lambda stack, now: stack.layer(Prospector).set_attributes(attrs, now))
    community.run(4 * FAST.min_update_interval_s + 0.5)
    assert community.p(community.root()).summary().numbers["memory_free"].high == 1 << 40


def test_a_described_node_publishes_what_changed_locally_at_its_next_update():
    community = Community(10, seed=9)
    community.run(5.0)
    node = next(i for i in community.net.nodes if not community.p(i).is_root)
    host = ReplicaHost(Contribution(cpu_cores=2, memory_bytes=4 << 30, disk_bytes=8 << 30, max_services=4))
    description = NodeDescription(host.contribution, host)
    described = Prospector(community.net.overlays[node], node, random.Random(1), FAST)
    stack = Stack([host, description, described])  # the node's layers, bottom to top
    now = community.net.now
    stack.next_event(now)  # the first description reaches the prospector, not the driver
    assert described.attributes["memory_free"] == 4 << 30
    described.start(now)
    spec = ReplicaSpec(ProcessSpec("r1", 1, ("true",)))
    assert host.start_replica(spec, Demand(memory_bytes=1 << 30), now) is None  # a replica reserves 1 GiB
    drained = []
    while (event := stack.next_event(now)) is not None:
        drained.append(event)
    assert drained and not any(isinstance(e, DescriptionChanged) for e in drained)  # replica events go on up
    stack.handle_timer(now + FAST.min_update_interval_s)
    assert described.attributes["memory_free"] == 3 << 30
    update = next(m for _, m in stack.messages_to_send() if isinstance(m, AggregateUpdate))
    assert update.attributes["memory_free"] == 3 << 30


# -- bad input and misuse -------------------------------------------------------------------


def test_bad_input_from_peers_is_dropped_and_counted(community):
    p = community.p(0)
    key, now = p.key, community.net.now
    far = (1 << 160) - 1  # key ^ far is the id farthest from the key: a child of anyone
    assert p.node_id != key ^ far
    # an "update" from a node closer to the key than us would make a cycle
    closer = key ^ 1
    p.receive(99, AggregateUpdate(closer, key, 1, 1, {}, None), now)
    assert p.dropped["inverted_update"] == 1
    farther = key ^ far
    p.receive(99, AggregateUpdate(farther, key, 1, 1, {"cpu": float("nan")}, None), now)
    assert p.dropped["bad_attributes"] == 1
    p.receive(99, AggregateUpdate(farther, key, 1, 2, {}, Summary(0)), now)
    assert p.dropped["bad_summary"] == 1
    p.receive(99, AggregateAck(farther, key, 12345, 0, None, None), now)
    assert p.dropped["unsolicited_ack"] == 1
    p.receive(99, AggregateUpdate(farther, key + 1, 1, 1, {}, None), now)
    assert p.dropped["foreign_tree"] == 1
    p.receive(99, ProspectRequest(1, Contact(farther, 99), key, "cpu >=", 1, [], False, 0), now)
    assert p.dropped["bad_prospect"] == 1
    p.receive(99, ProspectReply(424242, farther, 0, False, True, {}, [], []), now)
    p.receive(99, AggregateReply(424243, farther, 0, 1, 1, {}, []), now)
    assert p.dropped["unsolicited_reply"] == 2
    p.receive(99, AggregateRequest(1, Contact(farther, 99), key, "cpu", "median", 0), now)
    assert p.dropped["bad_aggregate"] == 1
    assert p.messages_to_send() == []


def test_a_false_match_or_candidate_from_a_peer_is_not_believed():
    community = Community(12, seed=8)
    community.run(5.0)
    asker = next(i for i in community.net.nodes if not community.p(i).is_root)
    p = community.p(asker)
    sent_before = len(community.net.sent)
    query = community.net.call(asker, lambda stack, now: stack.layer(Prospector).prospect('os == "plan9"', 2, now))
    src, dst, request = next((src, dst, m) for src, dst, m in community.net.sent[sent_before:]
                             if isinstance(m, ProspectRequest))
    target = community.net.overlays[dst].node_id
    liar = Contact(community.net.overlays[(dst + 1) % 12].node_id, (dst + 1) % 12)
    forged = ProspectReply(request.rpc_id, target, 0, True, True, attributes_to_wire({"os": "linux"}),
                           [Candidate(liar, attributes_to_wire({"os": "linux"}))], [])
    p.receive(dst, forged, community.net.now)  # arrives before the real answer
    assert p.dropped["false_match"] == 1 and p.dropped["false_candidate"] == 1
    community.run(3.0)
    finished = [e for e in community.net.events_of(ProspectFinished, asker) if e.query_id == query]
    assert finished and finished[0].nodes == []
    assert p.dropped["unsolicited_reply"] >= 1  # the real answer came too late to count


def test_local_misuse_names_what_was_wrong(community):
    p = community.p(0)
    with pytest.raises(ParseError, match="column"):
        p.prospect("cpu >=", 1, 0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        p.prospect("cpu >= 1", 0, 0.0)
    with pytest.raises(ValueError, match="fn must be one of"):
        p.aggregate("cpu", "median", 0.0)
    with pytest.raises(ValueError, match="needs an attribute"):
        p.aggregate(None, "sum", 0.0)
    with pytest.raises(ValueError, match="attribute 'load'"):
        p.set_attributes({"load": float("inf")}, 0.0)
    with pytest.raises(ValueError, match="expiry_s must be > update_interval_s"):
        ProspectorConfig(update_interval_s=10, expiry_s=5)


def test_spread_pick_prefers_new_owners_and_regions_then_keeps_order():
    items = [{"owner": "a", "region": "eu"}, {"owner": "a", "region": "us"}, {"owner": "b", "region": "eu"},
             {"owner": "b", "region": "us"}, {"owner": "c", "region": "eu"}]
    picked = spread_pick(items, 3, lambda item: item, ("owner", "region"))
    assert picked == [items[0], items[3], items[4]]
    assert spread_pick(items, 10, lambda item: item, ("owner",)) == [items[0], items[2], items[4], items[1], items[3]]


def test_at_the_cap_of_requests_in_flight_queries_wait_for_a_slot_or_finish_with_what_they_have(monkeypatch):
    monkeypatch.setattr(prospector_module, "MAX_RPCS", 1)
    community = Community(40, seed=3)
    community.run(10.0)
    asker = next(i for i in community.live() if i != community.root())
    requirement = "cpu_free >= 0"

    def prospect_then_aggregate(p, now):
        p.prospect(requirement, 40, now)  # its request to the root takes the one slot
        return p.aggregate(None, "count", now)

    failed = community.ask(asker, prospect_then_aggregate)
    assert isinstance(failed, AggregateFinished) and not failed.ok and failed.messages == 0
    community.run(20.0)
    (throttled,) = community.net.events_of(ProspectFinished, asker)  # one visit at a time, but complete
    assert {community.net.index_of(f.contact.node_id) for f in throttled.nodes} == community.matching(requirement)
    assert throttled.exhausted

    def aggregate_then_prospect(p, now):
        p.aggregate(None, "count", now)
        return p.prospect(requirement, 40, now)

    blocked = community.ask(asker, aggregate_then_prospect)  # no slot: only what the node knows itself
    assert not blocked.exhausted and blocked.messages == 0 and len(blocked.nodes) < 40
    assert community.ask(asker, lambda p, now: p.aggregate(None, "count", now)).ok  # the slot is free again
