"""The Kademlia layer over the store handed in: a node restarted over the store it had (what a
durable store gives a real node) serves what it held and keeps republishing what it published.
Driven by hand over the fake link (tests/overlay/fakenet.py)."""

import random

from p2pdeploy.overlay.kademlia import GetFinished, Kademlia, KademliaConfig
from p2pdeploy.overlay.storage import Item, LocalStore

from .fakenet import FakeNet

CONFIG = KademliaConfig(k=4, republish_interval_s=500.0, replicate_interval_s=100_000.0,
                        refresh_interval_s=100_000.0)


def restart(net: FakeNet, index: int) -> Kademlia:
    """Node ``index`` comes back as a new process: same id, the same store, an empty table."""
    old = net.nodes[index]
    node = Kademlia(old.node_id, random.Random(index + 1000), net.config, store=old.store)
    node.address = index
    net.nodes[index] = node
    return node


def test_by_default_a_node_has_a_store_of_its_own_with_the_configured_caps():
    node = Kademlia(1, random.Random(0), KademliaConfig(max_stored_items=7, max_stored_bytes=99))
    assert isinstance(node.store, LocalStore) and (node.store.max_items, node.store.max_bytes) == (7, 99)
    assert Kademlia(2, random.Random(0)).store is not node.store


def test_a_node_restarted_over_its_store_serves_what_it_held_and_resumes_republishing():
    net = FakeNet(seed=12, config=CONFIG)
    net.join_all(16)
    node = net.nodes[0]
    own_key = random.Random(1).getrandbits(160)
    held_key = node.node_id ^ 1  # node 0 is the closest node there is to it
    net.call(0, "put", own_key, b"published here", ttl_s=3600.0)
    net.call(5, "put", held_key, b"held here", ttl_s=3600.0)
    net.run(until=net.now)
    published_at = net.now
    assert held_key in node.store and own_key in node.published

    net.now += 100.0  # down for a while; then back with none of its peers up
    net.down = set(net.nodes) - {0}
    node = restart(net, 0)
    node.start(net.now)
    assert node.timer_deadline(("republish", own_key)) == published_at + 500.0  # on its old schedule
    for key, value in ((own_key, b"published here"), (held_key, b"held here")):
        query = net.call(0, "get", key)
        event = net.finished(GetFinished, query, 0)
        assert event.item == Item(value) and event.requests == 0  # served from its own store

    net.down.clear()
    net.call(0, "bootstrap", [1])
    net.run(until=published_at + 501.0)
    # a republish passes on a fresh TTL: the k closest now hold copies that live 3600 s from its time
    closest = sorted(net.nodes.values(), key=lambda n: n.node_id ^ own_key)[: CONFIG.k]
    assert {n.store.get(own_key, net.now).expires_at for n in closest} == {published_at + 500.0 + 3600.0}
    assert node.timer_deadline(("republish", own_key)) == published_at + 1000.0


def test_a_republish_that_fell_due_while_down_waits_for_a_bootstraps_first_answers():
    net = FakeNet(seed=13, config=CONFIG)
    net.join_all(8)
    key = random.Random(2).getrandbits(160)
    net.call(3, "put", key, b"v", ttl_s=3600.0)
    net.run(until=net.now)
    net.now += 2000.0  # past the republish that was due at +500
    node = restart(net, 3)
    node.start(net.now)
    assert node.timer_deadline(("republish", key)) == net.now + CONFIG.rpc_timeout_s


def test_unpublish_survives_a_restart_too():
    net = FakeNet(seed=14, config=CONFIG)
    net.join_all(6)
    key = random.Random(3).getrandbits(160)
    net.call(2, "put", key, b"v", ttl_s=3600.0)
    net.run(until=net.now)
    net.nodes[2].unpublish(key)
    node = restart(net, 2)
    node.start(net.now)
    assert node.published == {} and node.timer_deadline(("republish", key)) is None
