"""The Kademlia protocol over the simulator with an instant link (tests/simnet.py, latency 0)."""

import random

import pytest

from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import (
    GetFinished,
    Joined,
    Kademlia,
    KademliaConfig,
    LookupFinished,
    Nodes,
    Probe,
    PutFinished,
    Store,
    StoreReply,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, newer, sign_record
from tests.simnet import SimNet


def _truth(net, target, exclude, k):
    ids = [n.node_id for i, n in net.overlays.items() if i not in net.down and n.node_id != exclude]
    return sorted(ids, key=lambda i: i ^ target)[:k]


@pytest.fixture(scope="module")
def joined_net():
    net = SimNet(seed=3, latency_s=0.0, config=KademliaConfig(k=8, alpha=3))
    net.join_all(64, settle_s=10.0)
    return net


def test_every_node_joins_and_learns_contacts(joined_net):
    joined = [e for _, e in joined_net.events if isinstance(e, Joined)]
    assert len(joined) == 63 and all(e.ok for e in joined)
    assert min(len(n.table) for n in joined_net.overlays.values()) >= 8


@pytest.mark.parametrize("paths", [1, 3])
def test_lookup_finds_true_k_closest(paths):
    net = SimNet(seed=4, latency_s=0.0, config=KademliaConfig(k=8, alpha=3, disjoint_paths=paths))
    net.join_all(48, settle_s=10.0)
    rng = random.Random(1)
    for _ in range(40):
        source = rng.randrange(48)
        target = rng.getrandbits(160)
        query = net.call(source, "lookup", target)
        net.run(until=net.now)
        event = net.finished(LookupFinished, query, source)
        assert [c.node_id for c in event.closest] == _truth(net, target, net.overlays[source].node_id, 8)
        assert event.hops >= 1 and event.requests >= len(event.closest)


def test_put_stores_on_k_nodes_and_any_node_gets_it(joined_net):
    net = joined_net
    key = random.Random(2).getrandbits(160)
    query = net.call(5, "put", key, b"hello world")
    net.run(until=net.now)
    assert net.finished(PutFinished, query, 5).stored == 8
    holders = [n.node_id for n in net.overlays.values() if key in n.store]
    assert sorted(holders, key=lambda i: i ^ key) == _truth(net, key, None, 8)
    for reader in (0, 17, 63):
        query = net.call(reader, "get", key)
        net.run(until=net.now)
        assert net.finished(GetFinished, query, reader).item == Item(b"hello world")


def test_get_of_a_missing_key_finishes_empty(joined_net):
    query = joined_net.call(9, "get", 12345)
    joined_net.run(until=joined_net.now)
    event = joined_net.finished(GetFinished, query, 9)
    assert not event.found and event.item is None


def test_signed_record_highest_sequence_wins_and_stale_replicas_are_repaired():
    net = SimNet(seed=5, latency_s=0.0)
    net.join_all(32, settle_s=10.0)
    writer = Identity.from_seed(bytes(32))
    key, first = sign_record(writer, b"service/wiki", b"v1", 1)
    net.call(2, "put_item", key, first)
    net.run(until=net.now)
    key, second = sign_record(writer, b"service/wiki", b"v2", 2)
    # the new version reaches only some replicas: the others keep v1
    holders = [n for n in net.overlays.values() if key in n.store]
    for node in holders[:3]:
        node.store.put(key, second, 3600.0, net.now)
    query = net.call(20, "get", key, latest=True)
    net.run(until=net.now)
    assert net.finished(GetFinished, query, 20).item == second
    assert all(n.store.get(key, net.now).item == second for n in holders)  # read repair
    # an older sequence is refused by every replica
    query = net.call(4, "put_item", key, first)
    net.run(until=net.now)
    event = net.finished(PutFinished, query, 4)
    assert event.stored == 0 and all("older" in reason for reason in event.refusals)


def test_a_latest_get_picks_between_two_records_of_one_sequence_by_signature_as_persistence_does():
    net = SimNet(seed=5, latency_s=0.0)
    net.join_all(32, settle_s=10.0)
    writer = Identity.from_seed(bytes(32))
    key, one = sign_record(writer, b"service/wiki", b"written here", 7)
    _, other = sign_record(writer, b"service/wiki", b"written there", 7)
    winner, loser = (one, other) if newer(one, other) else (other, one)
    closest = sorted(net.overlays.values(), key=lambda n: n.node_id ^ key)[:8]
    for index, node in enumerate(closest):  # the loser lives longer: a TTL must not decide
        if index % 2:
            node.store.put(key, winner, 60.0, net.now)
        else:
            node.store.put(key, loser, 3600.0, net.now)
    reader = next(a for a, n in net.overlays.items() if n not in closest)
    query = net.call(reader, "get", key, latest=True)
    net.run(until=net.now)
    assert net.finished(GetFinished, query, reader).item == winner


def test_forged_or_misplaced_records_are_refused():
    net = SimNet(seed=6, latency_s=0.0)
    net.join_all(16, settle_s=10.0)
    writer = Identity.from_seed(bytes(31) + b"\x01")
    key, item = sign_record(writer, b"name", b"value", 1)
    forged = Item(b"evil", item.public_key, item.name, item.sequence, item.signature)
    with pytest.raises(ValueError, match="bad signature"):
        net.call(1, "put_item", key, forged)
    with pytest.raises(ValueError, match="does not match"):
        net.call(1, "put_item", key + 1, item)
    # a peer that stores a forged record directly is refused by the replica
    node = net.overlays[3]
    node.receive(7, Store(99, net.overlays[7].node_id, key, forged, 60.0), net.now)
    sent = node.messages_to_send()
    assert any(isinstance(m, StoreReply) and not m.ok and m.reason == "bad signature" for _, m in sent)
    assert key not in node.store


def test_replica_republish_cannot_defeat_expiry():
    config = KademliaConfig(k=4, replicate_interval_s=60.0, refresh_interval_s=600.0, expire_check_interval_s=10.0)
    net = SimNet(seed=7, latency_s=0.0, config=config)
    net.join_all(12, settle_s=10.0)
    net.call(0, "put", 42, b"short-lived", ttl_s=300.0)
    net.overlays[0].unpublish(42)  # the publisher walks away: only replicas republish
    net.run(until=net.now + 200.0)
    assert any(42 in n.store for n in net.overlays.values())
    net.run(until=net.now + 400.0)
    assert not any(n.store.get(42, net.now) for n in net.overlays.values())


def test_original_publisher_republish_keeps_a_value_alive():
    config = KademliaConfig(k=4, replicate_interval_s=60.0, republish_interval_s=100.0, expire_check_interval_s=10.0)
    net = SimNet(seed=8, latency_s=0.0, config=config)
    net.join_all(12, settle_s=10.0)
    net.call(0, "put", 43, b"kept", ttl_s=300.0)
    net.run(until=net.now + 1000.0)
    query = net.call(7, "get", 43)
    net.run(until=net.now)
    assert net.finished(GetFinished, query, 7).item == Item(b"kept")


def test_values_survive_losing_a_third_of_the_nodes_after_republish():
    config = KademliaConfig(k=6, replicate_interval_s=120.0, rpc_timeout_s=1.0)
    net = SimNet(seed=9, latency_s=0.0, config=config)
    net.join_all(45, settle_s=10.0)
    keys = [random.Random(i).getrandbits(160) for i in range(20)]
    for index, key in enumerate(keys):
        net.call(index, "put", key, b"v%d" % index)
    net.run(until=net.now)
    for index in range(0, 45, 3):  # a third crash at once, publishers among them
        net.crash(index)
    net.run(until=net.now + 400.0)  # replicas notice and republish
    for index, key in enumerate(keys):
        reader = next(i for i in range(44, -1, -1) if i not in net.down)
        query = net.call(reader, "get", key)
        net.run(until=net.now + 30.0)
        assert net.finished(GetFinished, query, reader).item == Item(b"v%d" % index)


def test_unsolicited_replies_are_counted_and_dropped():
    node = Kademlia(1, random.Random(1), KademliaConfig(k=4))
    node.receive(("127.0.0.1", 9), Nodes(777, 5, []), 0.0)
    assert node.dropped["unsolicited_reply"] == 1
    assert node.messages_to_send() == [] and node.next_event() is None


def test_a_request_teaches_an_open_table_and_is_answered():
    """Without contact verification (tests/overlay/test_admission.py has it), a sender joins at once."""
    node = Kademlia(1, random.Random(1), KademliaConfig(k=4, verify_contacts=False))
    node.receive(("127.0.0.1", 9), Probe(5, 1234), 0.0)
    assert node.table.get(1234).address == ("127.0.0.1", 9)
    [(dst, reply)] = node.messages_to_send()
    assert dst == ("127.0.0.1", 9) and reply.rpc_id == 5 and reply.sender == 1


def test_snapshot_restores_contacts_and_ignores_foreign_or_corrupt_files(joined_net):
    source = joined_net.overlays[10]
    data = source.snapshot()
    fresh = Kademlia(source.node_id, random.Random(0), joined_net.config)
    assert fresh.restore(data) == len(source.table)
    assert sorted(c.node_id for c in fresh.table.contacts()) == sorted(c.node_id for c in source.table.contacts())
    stranger = Kademlia(source.node_id ^ 1, random.Random(0), joined_net.config)
    assert stranger.restore(data) == 0
    assert fresh.restore(data[:-3]) == 0


def test_bad_configuration_names_the_field():
    with pytest.raises(ValueError, match="kademlia.alpha must be >= 1"):
        KademliaConfig(alpha=0)
    with pytest.raises(ValueError, match="kademlia.rpc_timeout_s must be > 0"):
        KademliaConfig(rpc_timeout_s=0)


def test_a_joining_node_close_to_a_key_is_handed_the_value():
    # the newcomer's id is chosen, not derived from a key: the others take it without a challenge
    net = SimNet(seed=11, latency_s=0.0, config=KademliaConfig(k=4, verify_contacts=False))
    net.join_all(20, settle_s=10.0)
    key = random.Random(3).getrandbits(160)
    net.call(0, "put", key, b"handed")
    net.run(until=net.now)
    # a newcomer whose id is the key itself is the closest node there can be
    newcomer_address = net.add(node_id=key ^ 1)
    newcomer = net.overlays[newcomer_address]
    net.call(newcomer_address, "bootstrap", [0])
    net.run(until=net.now + 10.0)
    assert newcomer.store.get(key, net.now).item == Item(b"handed")


def test_next_hop_towards_a_key_leads_to_its_root(joined_net):
    net = joined_net
    key = random.Random(21).getrandbits(160)
    root = min(net.overlays.values(), key=lambda n: n.node_id ^ key)
    assert root.next_hop_towards(key) is None
    for start in list(net.overlays.values())[:10]:
        node, hops = start, 0
        while (hop := node.next_hop_towards(key)) is not None:
            assert hop.node_id ^ key < node.node_id ^ key  # every hop gets strictly closer
            node, hops = net.overlays[hop.address], hops + 1
        assert node is root and hops <= 8


def test_buckets_partition_the_id_space_and_hold_the_table(joined_net):
    node = joined_net.overlays[0]
    views = node.buckets()
    assert views[0][0] == 0 and sum(size for _, size, _ in views) == 1 << 160
    assert sum(len(contacts) for _, _, contacts in views) == node.contact_count()
    assert node.is_among_closest(node.node_id)


def test_layers_above_feed_the_table_what_they_hear_and_whom_they_miss():
    node = Kademlia(1, random.Random(1), KademliaConfig(k=1, b=1, verify_contacts=False))
    a, b = Contact(2**159 + 5, ("127.0.0.1", 5)), Contact(2**159 + 7, ("127.0.0.1", 7))
    node.heard(a, 0.0)
    assert node.closest_known(a.node_id, 1) == [a]
    node.unreachable(a.node_id)
    node.unreachable(a.node_id)
    node.unreachable(a.node_id)
    assert node.table.get(a.node_id) == a, "no replacement waits: a stays, however often it failed"
    node.heard(b, 1.0)  # the bucket is full: b waits as a replacement and a is probed
    assert node.table.get(b.node_id) is None
    assert [type(msg) for _, msg in node.messages_to_send()] == [Probe]
    node.unreachable(a.node_id)
    assert node.table.get(a.node_id) is None and node.table.get(b.node_id) == b
