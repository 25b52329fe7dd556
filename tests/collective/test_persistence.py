"""Blobs on the r closest nodes: placement, fetching, repair, handoff, corruption, eventual records.

Each test drives the simulator (``StorageNet``: Kademlia plus persistence on every node, full
routing tables, constant 10 ms latency) with a fixed seed.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.persistence import (
    BlobFetched,
    BlobStored,
    ChunkCorrupted,
    FindHolders,
    HandedOff,
    MemoryStore,
    Persistence,
    PersistenceConfig,
    RecordFound,
    RecordStored,
    StoreChunk,
    Stored,
    StoreRecord,
)
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.storage import Item, record_key, sign_record
from tests.simnet import StorageNet

#: Small chunks keep the simulated transfers short; the logic does not depend on the size.
CONFIG = PersistenceConfig(chunk_bytes=4096, repair_interval_s=30.0)


def blob(seed: int, size: int = 20_000) -> bytes:
    return random.Random(seed).randbytes(size)


def keys_of(data: bytes, config: PersistenceConfig = CONFIG, replicas: int = 3) -> list[int]:
    chunked = split(data, config.chunk_bytes, replicas)
    return [chunked.blob_id, *dict(chunked.chunks)]


def store(net: StorageNet, address: int, data: bytes, **kwargs) -> BlobStored:
    query = net.call(address, lambda p, now: p.put_blob(data, now, **kwargs))
    return net.result(address, query, BlobStored)


def fetch(net: StorageNet, address: int, blob_id: int, **kwargs) -> BlobFetched:
    query = net.call(address, lambda p, now: p.get_blob(blob_id, now, **kwargs))
    return net.result(address, query, BlobFetched)


def live_holders(net: StorageNet, key: int) -> set[int]:
    return {a for a in net.holders(key) if net.up(a)}


def test_each_chunk_of_a_blob_is_stored_on_the_r_closest_nodes():
    net = StorageNet(16, seed=1, config=CONFIG)
    data = blob(1)
    event = store(net, 0, data)
    assert event.ok and event.replicas == 3 and event.size == len(data) and event.chunks == 5
    for key in keys_of(data):
        assert set(net.holders(key)) == set(net.closest(key, 3))


def test_a_blob_is_fetched_byte_identical_from_every_node():
    net = StorageNet(12, seed=2, config=CONFIG)
    data = blob(2)
    blob_id = store(net, 3, data).blob_id
    for address in range(12):
        assert fetch(net, address, blob_id).data == data


def test_a_blob_nobody_stored_is_not_found():
    net = StorageNet(8, seed=3, config=CONFIG)
    event = fetch(net, 1, 12345)
    assert not event.found and "manifest not found" in event.reason


def test_a_blob_may_ask_for_its_own_replication_factor():
    net = StorageNet(16, seed=4, config=CONFIG)
    data = blob(4)
    assert store(net, 0, data, replicas=5).replicas == 5
    for key in keys_of(data, replicas=5):
        assert set(net.holders(key)) == set(net.closest(key, 5))


def test_repair_brings_every_key_back_to_r_live_copies_on_the_closest_nodes():
    net = StorageNet(20, seed=5, config=CONFIG)
    data = blob(5)
    store(net, 0, data)
    keys = keys_of(data)
    victims = {a for key in keys for a in net.holders(key)[:2]} - {0}
    for address in victims:
        net.crash(address)
    net.run_for(2.5 * CONFIG.repair_interval_s)
    for key in keys:
        assert live_holders(net, key) == set(net.closest(key, 3)), key
    assert fetch(net, 0, keys[0]).data == data


def test_when_old_holders_return_the_surplus_copies_are_dropped():
    net = StorageNet(20, seed=6, config=CONFIG)
    data = blob(6)
    store(net, 0, data)
    keys = keys_of(data)
    victims = {net.holders(key)[0] for key in keys} - {0}
    for address in victims:
        net.crash(address)
    net.run_for(2.5 * CONFIG.repair_interval_s)
    for address in victims:
        net.restart(address)  # back with its disk: it holds its old copies again
    net.run_for(5 * CONFIG.repair_interval_s)
    for key in keys:
        assert set(net.holders(key)) == set(net.closest(key, 3)), key
    dropped = sum(net.persistence(a).counters["surplus_dropped"] for a in range(20))
    assert dropped >= len(keys)


def test_a_restarted_node_serves_what_it_held():
    net = StorageNet(10, seed=7, config=PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0))
    data = blob(7, 3000)  # one chunk and the manifest
    blob_id = store(net, 0, data, replicas=1).blob_id
    (holder,) = net.holders(blob_id)
    (chunk_holder,) = net.holders(keys_of(data, replicas=1)[1])
    net.crash(holder)
    net.crash(chunk_holder)
    reader = next(a for a in range(10) if net.up(a))
    assert not fetch(net, reader, blob_id).found
    net.restart(holder)
    net.restart(chunk_holder)
    assert fetch(net, reader, blob_id).data == data


def test_a_node_that_joins_closer_to_a_key_receives_it():
    net = StorageNet(20, seed=8, config=CONFIG)
    data = blob(8)
    keys = keys_of(data)
    newcomer = net.closest(keys[0], 1)[0]
    net.crash(newcomer)  # not there yet when the blob is stored
    store(net, 0 if newcomer else 1, data)
    assert newcomer not in net.holders(keys[0])
    net.restart(newcomer)
    net.run_for(2.5 * CONFIG.repair_interval_s)
    assert newcomer in net.holders(keys[0])
    for key in keys:
        assert set(net.holders(key)) == set(net.closest(key, 3))


def test_a_graceful_leave_hands_every_key_to_the_next_closest_before_any_repair_round():
    config = PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0)
    net = StorageNet(16, seed=9, config=config)
    data = blob(9)
    store(net, 0, data)
    keys = keys_of(data, config)
    leaver = next(a for a in net.holders(keys[0]) if a != 0)
    query = net.call(leaver, lambda p, now: p.leave(now))
    event = net.result(leaver, query, HandedOff)
    assert event.keys == sum(1 for key in keys if leaver in net.holders(key))
    assert event.copies == event.keys  # each key had one new closest node, which acknowledged its copy
    net.crash(leaver)  # at once: the copies are in place when HandedOff is emitted
    for key in keys:
        assert live_holders(net, key) >= set(net.closest(key, 3)), key


def test_a_corrupt_chunk_is_detected_by_the_scrub_and_fetched_again_from_a_replica():
    config = PersistenceConfig(chunk_bytes=4096, scrub_interval_s=60.0, repair_interval_s=3600.0)
    net = StorageNet(12, seed=10, config=config)
    data = blob(10)
    store(net, 0, data)
    key = keys_of(data, config)[2]
    victim = net.holders(key)[0]
    net.stores[victim].corrupt(key)
    net.run_for(2 * config.scrub_interval_s)
    assert (victim, ChunkCorrupted(key)) in net.events
    assert net.stores[victim].read_chunk(key) == dict(split(data, 4096).chunks)[key]
    assert net.persistence(victim).counters["corrupt_repaired"] == 1


def test_a_corrupt_local_copy_is_never_returned_and_the_fetch_uses_a_replica():
    config = PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0)
    net = StorageNet(12, seed=11, config=config)
    data = blob(11)
    blob_id = store(net, 0, data).blob_id
    key = keys_of(data, config)[1]
    victim = net.holders(key)[0]
    net.stores[victim].corrupt(key)
    assert fetch(net, victim, blob_id).data == data
    net.run_for(5.0)
    assert net.stores[victim].read_chunk(key) is not None  # restored from a replica


def test_a_node_caches_a_blob_it_fetches_with_keep_and_serves_it():
    net = StorageNet(12, seed=12, config=CONFIG)
    data = blob(12)
    blob_id = store(net, 0, data).blob_id
    cache = next(a for a in range(12) if a not in net.holders(blob_id))
    assert fetch(net, cache, blob_id, keep=True).data == data
    assert all(net.stores[cache].chunk_info(key).pinned for key in keys_of(data))
    net.run_for(3 * CONFIG.repair_interval_s)  # a pinned copy is not a surplus one
    assert all(cache in net.holders(key) for key in keys_of(data))
    net.call(cache, lambda p, now: p.unpin(blob_id))
    assert not any(net.stores[cache].chunk_info(key).pinned for key in keys_of(data))


def test_a_full_store_refuses_and_the_next_closest_node_takes_the_copy():
    net = StorageNet(12, seed=13, config=CONFIG)
    data = blob(13, 4000)
    key = keys_of(data)[1]
    full = net.closest(key, 1)[0]
    net.stores[full].capacity_bytes = 0
    store(net, (full + 1) % 12, data)
    assert full not in net.holders(key)
    assert set(net.holders(key)) == set(net.closest(key, 4)) - {full}


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), crashes=st.integers(1, 2))
def test_repair_keeps_r_copies_whenever_fewer_than_r_holders_crash_at_once(seed, crashes):
    net = StorageNet(14, seed=seed, config=CONFIG)
    data = blob(seed, 9000)
    store(net, 0, data)
    rng = random.Random(seed)
    keys = keys_of(data)
    for key in keys:
        for address in rng.sample(sorted(live_holders(net, key)), crashes):
            if address != 0:
                net.crash(address)
        net.run_for(2.5 * CONFIG.repair_interval_s)
        assert all(live_holders(net, k) for k in keys)
    for key in keys:
        assert live_holders(net, key) >= set(net.closest(key, 3))
    assert fetch(net, 0, keys[0]).data == data


# -- eventual records ------------------------------------------------------------------------------

WRITER = Identity.from_seed(bytes(range(1, 33)))


def put_record(net: StorageNet, address: int, item: Item) -> RecordStored:
    query = net.call(address, lambda p, now: p.put_record(item, now))
    return net.result(address, query, RecordStored)


def get_record(net: StorageNet, address: int, key: int) -> Item | None:
    query = net.call(address, lambda p, now: p.get_record(key, now))
    return net.result(address, query, RecordFound).item


def test_an_eventual_record_is_read_back_and_the_highest_sequence_wins():
    net = StorageNet(12, seed=20, config=CONFIG, trusting=frozenset({WRITER.public_key}))
    key, first = sign_record(WRITER, b"service/wiki", b"v1", 1)
    assert put_record(net, 0, first).stored == 3
    _, second = sign_record(WRITER, b"service/wiki", b"v2", 2)
    put_record(net, 5, second)
    assert get_record(net, 9, key) == second
    assert put_record(net, 7, first).stored == 3  # the replicas keep the newer one
    assert get_record(net, 2, key) == second
    assert get_record(net, 2, record_key(WRITER.public_key, b"nothing")) is None


def test_a_read_repairs_replicas_that_hold_an_older_record():
    net = StorageNet(12, seed=21, config=PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0))
    key, old = sign_record(WRITER, b"name", b"old", 1)
    put_record(net, 0, old)
    _, new = sign_record(WRITER, b"name", b"new", 2)
    stale = net.holders(key)[0]
    net.stores[[a for a in net.holders(key) if a != stale][0]].write_record(key, new, 3)
    assert get_record(net, 4, key) == new
    net.run_for(2.0)
    assert all(net.stores[a].read_record(key)[0] == new for a in net.closest(key, 3))
    assert sum(net.persistence(a).counters["read_repairs"] for a in range(12)) >= 1


def test_eventual_records_are_repaired_like_chunks():
    net = StorageNet(16, seed=22, config=CONFIG, trusting=frozenset({WRITER.public_key}))
    key, item = sign_record(WRITER, b"r", b"value", 1)
    put_record(net, 0, item)
    for address in net.holders(key)[:2]:
        if address != 0:
            net.crash(address)
    net.run_for(2.5 * CONFIG.repair_interval_s)
    assert {a for a in net.holders(key) if net.up(a)} >= set(net.closest(key, 3))


# -- misuse and bad input --------------------------------------------------------------------------


def test_local_misuse_names_what_was_wrong():
    net = StorageNet(3, seed=30, config=CONFIG)
    layer = net.persistence(0)
    with pytest.raises(ValueError, match="replicas must be in"):
        layer.put_blob(b"x", 0.0, replicas=0)
    with pytest.raises(ValueError, match="blob_id must be a 160-bit int"):
        layer.get_blob(-1, 0.0)
    with pytest.raises(ValueError, match="must be signed"):
        layer.put_record(Item(b"plain"), 0.0)
    key, item = sign_record(WRITER, b"n", b"v", 1)
    forged = Item(b"evil", item.public_key, item.name, 2, item.signature)
    with pytest.raises(ValueError, match="bad signature"):
        layer.put_record(forged, 0.0)
    with pytest.raises(ValueError, match="over the limit"):
        layer.quorum_put(WRITER, b"n", bytes(CONFIG.max_record_bytes + 1), 0.0)
    with pytest.raises(ValueError, match="persistence.replicas must be >= 1"):
        PersistenceConfig(replicas=0)


def test_bad_input_from_a_peer_is_dropped_and_counted_never_raised():
    net = StorageNet(3, seed=31, config=CONFIG)
    layer = net.persistence(0)
    peer = net.node_id(1)
    key, item = sign_record(WRITER, b"n", b"v", 1)
    forged = Item(b"evil", item.public_key, item.name, 2, item.signature)
    layer.receive(1, StoreChunk(7, peer, 12345, b"not that chunk", 3), 0.0)
    layer.receive(1, StoreChunk(8, peer, 12345, b"x", 99), 0.0)
    layer.receive(1, StoreRecord(9, peer, key, forged, 3), 0.0)
    layer.receive(1, FindHolders(10, peer, key, 42), 0.0)
    layer.receive(1, Stored(11, peer, True), 0.0)  # an answer to nothing we asked
    replies = layer.messages_to_send()
    assert [type(msg) for _, msg in replies].count(Stored) == 3
    assert not any(msg.ok for _, msg in replies if isinstance(msg, Stored))
    assert layer.dropped == Counter({"bad_chunk": 1, "bad_store": 1, "bad_record": 1, "bad_kind": 1,
                                     "unsolicited_reply": 1})
    assert net.stores[0].chunk_info(12345) is None and net.stores[0].read_record(key) is None


def test_memory_store_keeps_its_quota_and_reports_corruption():
    store_ = MemoryStore(capacity_bytes=20)
    data = b"a real chunk"
    key = split(data, 100).chunks[0][0]
    assert store_.write_chunk(key, data, 3) is None
    other = b"another chunk"
    assert store_.write_chunk(split(other, 100).chunks[0][0], other, 3) == "store is full"
    assert store_.used_bytes() == len(data)
    store_.corrupt(key)
    assert store_.read_chunk(key) is None
    assert [info.key for info in store_.take_corrupted()] == [key]
    assert store_.chunk_info(key) is None and store_.corruptions == 1 and store_.used_bytes() == 0


def test_persistence_is_a_layer_of_the_node_stack():
    net = StorageNet(2, seed=32, config=CONFIG)
    core = net.sim.hosts[0].core
    assert isinstance(core.layer(Persistence), Persistence)


def test_the_layer_reports_peers_it_hears_from_and_misses_to_an_overlay_that_listens():
    """``Kademlia.heard``/``unreachable`` do not exist yet; when they do, this layer feeds them."""
    from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
    from p2pdeploy.overlay.routing import Contact

    class ListeningOverlay(Kademlia):
        def __init__(self, *args):
            super().__init__(*args)
            self.heard_from: list[int] = []
            self.missed: list[int] = []

        def heard(self, contact, now):
            self.heard_from.append(contact.node_id)

        def unreachable(self, node_id):
            self.missed.append(node_id)

    overlay = ListeningOverlay(1 << 150, random.Random(1), KademliaConfig(k=4))
    layer = Persistence(overlay, MemoryStore(), random.Random(2), 0.0, own_address=0, config=CONFIG)
    layer.receive(7, FindHolders(1, 77, 5, 0), 0.0)
    overlay.table.add(Contact(88, 8))
    layer.get_blob(5, 0.0)
    (request,) = [msg for dst, msg in layer.messages_to_send() if isinstance(msg, FindHolders)]
    layer.handle_timer(100.0)
    assert overlay.heard_from == [77] and overlay.missed == [88]


def test_a_leaving_nodes_copy_refused_for_want_of_room_goes_to_the_next_closest():
    config = PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0)
    net = StorageNet(16, seed=11, config=config)
    data = blob(11)
    store(net, 0, data)
    key = keys_of(data, config)[1]
    ranked = net.closest(key, 5)
    holders = set(net.holders(key))
    assert set(ranked[:3]) <= holders
    leaver = next(a for a in ranked[:3] if a != 0)
    first_choice, spare = [a for a in ranked if a not in holders][:2]
    full = net.stores[first_choice]
    full.capacity_bytes = full.used_bytes()  # it answers the search, then refuses the copy: no room
    query = net.call(leaver, lambda p, now: p.leave(now))
    event = net.result(leaver, query, HandedOff)
    assert event.copies == event.keys
    assert spare in net.holders(key) and first_choice not in net.holders(key)
    assert net.persistence(leaver).counters["handoff_spares"] >= 1
