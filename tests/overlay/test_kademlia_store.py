"""The Kademlia layer over the store handed in: a node restarted over the store it had (what a
durable store gives a real node) serves what it held and keeps republishing what it published.
Driven over the simulator with an instant link (tests/simnet.py, latency 0)."""

import random

from p2pdeploy.overlay.kademlia import GetFinished, Kademlia, KademliaConfig
from p2pdeploy.overlay.storage import Item, LocalStore
from tests.simnet import SimNet

CONFIG = KademliaConfig(k=4, republish_interval_s=500.0, replicate_interval_s=100_000.0,
                        refresh_interval_s=100_000.0)


def network(seed: int, nodes: int) -> SimNet:
    net = SimNet(seed=seed, latency_s=0.0, capacity=nodes, config=CONFIG)
    net.join_all(nodes, settle_s=10.0)
    return net


def restart(net: SimNet, index: int) -> Kademlia:
    """Node ``index`` comes back as a new process: same id, the same store, an empty table."""
    net.restart(index, keep_overlay_store=True)
    return net.overlays[index]


def test_by_default_a_node_has_a_store_of_its_own_with_the_configured_caps():
    node = Kademlia(1, random.Random(0), KademliaConfig(max_stored_items=7, max_stored_bytes=99))
    assert isinstance(node.store, LocalStore) and (node.store.max_items, node.store.max_bytes) == (7, 99)
    assert Kademlia(2, random.Random(0)).store is not node.store


def test_a_node_restarted_over_its_store_serves_what_it_held_and_resumes_republishing():
    net = network(12, 16)
    node = net.overlays[0]
    own_key = node.node_id ^ 2  # node 0 is among the k closest to both keys: it holds copies
    held_key = node.node_id ^ 1  # node 0 is the closest node there is to it
    net.call(0, "put", own_key, b"published here", ttl_s=3600.0)
    net.call(5, "put", held_key, b"held here", ttl_s=3600.0)
    net.run(until=net.now)
    published_at = net.now
    assert held_key in node.store and own_key in node.published

    net.crash(0)  # down for a while; then back with none of its peers up
    for index in range(1, 16):
        net.pause(index)
    net.run_for(100.0)
    node = restart(net, 0)
    assert node.timer_deadline(("republish", own_key)) == published_at + 500.0  # on its old schedule
    for key, value in ((own_key, b"published here"), (held_key, b"held here")):
        query = net.call(0, "get", key)
        event = net.finished(GetFinished, query, 0)
        assert event.item == Item(value) and event.requests == 0  # served from its own store

    for index in range(1, 16):
        net.resume(index)
    net.call(0, "bootstrap", [1])
    net.run(until=published_at + 501.0)
    # a republish passes on a fresh TTL: the k closest now hold copies that live 3600 s from its time
    closest = sorted(net.overlays.values(), key=lambda n: n.node_id ^ own_key)[: CONFIG.k]
    assert {n.store.get(own_key, net.now).expires_at for n in closest} == {published_at + 500.0 + 3600.0}
    assert node.timer_deadline(("republish", own_key)) == published_at + 1000.0


def test_a_republish_that_fell_due_while_down_waits_for_a_bootstraps_first_answers():
    net = network(13, 8)
    key = random.Random(2).getrandbits(160)
    net.call(3, "put", key, b"v", ttl_s=3600.0)
    net.run(until=net.now)
    net.crash(3)
    net.run_for(2000.0)  # past the republish that was due at +500
    node = restart(net, 3)
    assert node.timer_deadline(("republish", key)) == net.now + CONFIG.rpc_timeout_s


def test_unpublish_survives_a_restart_too():
    net = network(14, 6)
    key = random.Random(3).getrandbits(160)
    net.call(2, "put", key, b"v", ttl_s=3600.0)
    net.run(until=net.now)
    net.overlays[2].unpublish(key)
    net.crash(2)
    node = restart(net, 2)
    assert node.published == {} and node.timer_deadline(("republish", key)) is None
