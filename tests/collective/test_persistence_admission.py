"""Who may fill a node's store: pins, quotas for strangers, the replication cap, collection.

The attacks first (each fails on the code before storage admission): a stranger floods every
node's store, asks for more copies than the cap (directly, or by announcing a replication
factor in a repair search), and leaves chunks that never expire. Then the rules one by one, by
driving a node's layer by hand. The simulator (``StorageNet``) runs with a fixed seed; the
members trust one another's keys, the stranger's key nobody trusts.
"""

from __future__ import annotations

import dataclasses
import random

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.persistence import (
    Accept,
    Accepted,
    BlobFetched,
    BlobStored,
    FindHolders,
    MemoryStore,
    PersistenceConfig,
    StoreChunk,
    Stored,
    StorePin,
    StoreRecord,
    sign_pin,
)
from p2pdeploy.collective.persistence_admission import MIN_CHARGE_BYTES
from p2pdeploy.collective.records import Ballot
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import sign_record
from tests.simnet import StorageNet

CONFIG = PersistenceConfig(chunk_bytes=4096, repair_interval_s=30.0)
CHUNK = 4096
STRANGER = 8  # the address of the stranger in a net of 9


def chunk(seed: int, size: int = CHUNK) -> tuple[int, bytes]:
    data = random.Random(seed).randbytes(size)
    return split(data, size).chunks[0][0], data


def blob(seed: int, size: int = 20_000) -> bytes:
    return random.Random(seed).randbytes(size)


def store(net: StorageNet, address: int, data: bytes, **kwargs) -> BlobStored:
    query = net.call(address, lambda p, now: p.put_blob(data, now, **kwargs))
    return net.result(address, query, BlobStored)


def fetch(net: StorageNet, address: int, blob_id: int) -> BlobFetched:
    query = net.call(address, lambda p, now: p.get_blob(blob_id, now))
    return net.result(address, query, BlobFetched)


def keys_of(data: bytes, replicas: int = 3) -> list[int]:
    chunked = split(data, CONFIG.chunk_bytes, replicas)
    return [chunked.blob_id, *dict(chunked.chunks)]


def send_raw(net: StorageNet, address: int, dst: int, msg) -> None:
    """``msg`` from node ``address`` to ``dst`` as it is (an attacker's own code sends what it likes)."""
    net.call(address, lambda p, now: p.send(dst, msg))


def stranger_net(nodes: int = 9, *, seed: int, capacity_bytes: int = 1 << 40) -> StorageNet:
    return StorageNet(nodes, seed=seed, config=CONFIG, strangers=frozenset({nodes - 1}), capacity_bytes=capacity_bytes)


# -- the attacks --------------------------------------------------------------------------------


def test_a_stranger_flooding_every_store_leaves_room_for_a_legitimate_blob_put():
    capacity = 256 * 1024
    net = stranger_net(seed=1, capacity_bytes=capacity)
    # 80 chunks of 4 KiB (320 KiB, more than any store holds) to every member, asking for 16
    # copies, from as many made-up sender ids
    for n in range(80):
        key, data = chunk(1000 + n)
        for member in range(STRANGER):
            send_raw(net, STRANGER, member, StoreChunk(n + 1, 7_000 + n, key, data, 16))
    net.run_for(5.0)
    for member in range(STRANGER):
        assert net.stores[member].used_bytes() <= capacity // 10
    assert sum(net.persistence(m).counters["store_unauthorized"] for m in range(STRANGER)) > 0
    data = blob(2, 60_000)
    event = store(net, 0, data)
    assert event.ok and event.replicas == 3, event.reason
    assert fetch(net, 5, event.blob_id).data == data


def test_repair_does_not_spread_a_strangers_chunk_that_asked_for_16_copies():
    net = stranger_net(20, seed=3)
    stranger = 19
    key, data = chunk(3)
    target = net.closest(key, 1)[0]
    send_raw(net, stranger, target, StoreChunk(1, net.node_id(stranger), key, data, 16))
    net.run_for(4 * CONFIG.repair_interval_s)
    assert 1 <= len(net.holders(key)) <= CONFIG.max_replicas


def test_a_replication_factor_announced_in_a_search_does_not_spread_a_key_beyond_the_cap():
    net = stranger_net(20, seed=4)
    stranger = 19
    data = blob(4)
    assert store(net, 0, data).ok
    key = keys_of(data)[1]
    for holder in net.holders(key):  # "this key has 16 copies": a repair check's announcement
        send_raw(net, stranger, holder, FindHolders(holder + 1, net.node_id(stranger), key, 0, True, 16))
    net.run_for(4 * CONFIG.repair_interval_s)
    assert len(net.holders(key)) <= CONFIG.max_replicas


def test_a_strangers_chunk_is_collected_after_the_grace_period_and_a_members_blob_is_kept():
    net = stranger_net(seed=5)
    key, data = chunk(5)
    target = net.closest(key, 1)[0]
    send_raw(net, STRANGER, target, StoreChunk(1, net.node_id(STRANGER), key, data, 3))
    member_blob = blob(6)
    event = store(net, 1, member_blob)
    assert event.ok
    net.run_for(10.0)
    assert net.holders(key) == [target], "kept within the stranger's quota for now"
    net.run_for(CONFIG.unpinned_grace_s + 3 * CONFIG.repair_interval_s)
    assert net.holders(key) == []
    assert net.persistence(target).counters["collected"] == 1
    for k in keys_of(member_blob):
        assert len(net.holders(k)) == 3
    assert fetch(net, 4, event.blob_id).data == member_blob


# -- the rules, one by one ------------------------------------------------------------------------


def test_a_stranger_beyond_its_own_quota_gets_the_reason_and_nothing_changes():
    config = dataclasses.replace(CONFIG, stranger_quota_bytes=3 * CHUNK)
    net = StorageNet(3, seed=10, config=config, strangers=frozenset({2}))
    layer, stranger = net.persistence(0), net.node_id(2)
    sent = [chunk(10 + n) for n in range(4)]
    for n, (key, data) in enumerate(sent):
        layer.receive(2, StoreChunk(n + 1, stranger, key, data, 3), net.now)
    replies = [msg for _, msg in layer.messages_to_send() if isinstance(msg, Stored)]
    assert [r.ok for r in replies] == [True, True, True, False]
    assert "not authorized" in replies[3].reason and str(3 * CHUNK) in replies[3].reason
    assert layer.counters["store_unauthorized"] == 1
    assert net.stores[0].chunk_info(sent[3][0]) is None
    # another sender has a quota of its own
    key, data = chunk(20)
    layer.receive(2, StoreChunk(9, stranger + 1, key, data, 3), net.now)
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored)] == [True]


def test_a_pin_by_an_untrusted_key_a_forged_pin_or_an_expired_one_does_not_authorize():
    config = dataclasses.replace(CONFIG, stranger_quota_bytes=0)
    net = StorageNet(3, seed=11, config=config, strangers=frozenset({2}))
    layer, sender = net.persistence(0), net.node_id(1)
    member, outsider = net.identity_of(1), net.identity_of(2)
    key, data = chunk(11)
    far = int(net.now + 3600)
    pins = [sign_pin(outsider, key, far),
            dataclasses.replace(sign_pin(member, key, far), expires_at=far + 1),  # forged: the expiry moved
            sign_pin(member, key, int(net.now) - 1),
            sign_pin(member, key + 1, far)]
    for n, pin in enumerate(pins):
        layer.receive(1, StoreChunk(n + 1, sender, key, data, 3, 0, pin), net.now)
    reasons = [msg.reason for _, msg in layer.messages_to_send() if isinstance(msg, Stored)]
    assert len(reasons) == 4 and all("not authorized" in r for r in reasons)
    assert "does not trust" in reasons[0] and "does not verify" in reasons[1]
    assert "expired" in reasons[2] and "another key" in reasons[3]
    assert layer.counters["pins_refused"] == 4 and net.stores[0].chunk_info(key) is None
    layer.receive(1, StoreChunk(9, sender, key, data, 3, 0, sign_pin(member, key, far)), net.now)
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored)] == [True]
    assert net.stores[0].chunk_info(key).pin.public_key == member.public_key


def test_a_copy_asking_for_more_than_the_cap_is_kept_with_the_cap():
    net = StorageNet(3, seed=12, config=CONFIG)
    layer, member = net.persistence(0), net.identity_of(1)
    key, data = chunk(12)
    pin = sign_pin(member, key, int(net.now + 3600))
    layer.receive(1, StoreChunk(1, net.node_id(1), key, data, 16, 0, pin), net.now)
    assert net.stores[0].chunk_info(key).replicas == CONFIG.max_replicas
    assert layer.counters["replicas_clamped"] == 1


def test_repair_spreads_a_trusted_chunk_that_asked_for_16_copies_to_the_cap_and_no_further():
    net = StorageNet(20, seed=13, config=CONFIG)
    key, data = chunk(13)
    pin = sign_pin(net.identity_of(0), key, int(net.now + 3600))
    target = net.closest(key, 1)[0]
    send_raw(net, 0, target, StoreChunk(1, net.node_id(0), key, data, 16, 0, pin))
    net.run_for(4 * CONFIG.repair_interval_s)
    assert set(net.holders(key)) == set(net.closest(key, CONFIG.max_replicas))


def test_a_strangers_records_are_collected_a_grace_after_they_were_stored():
    """A record by a writer no node trusts was kept for ever within the quota (so the strangers'
    share of the store, once full, stayed full); now it goes like an unpinned chunk, unless its
    writer writes a newer one. A trusted writer's records stay."""
    config = dataclasses.replace(CONFIG, unpinned_grace_s=300.0)
    net = StorageNet(3, seed=22, config=config)
    layer, writer, member = net.persistence(0), Identity.from_seed(bytes(range(6, 38))), net.identity_of(1)
    records = [sign_record(writer, b"old", b"x", 1), sign_record(writer, b"kept", b"y", 1),
               sign_record(member, b"trusted", b"z", 1)]
    for n, (key, item) in enumerate(records):
        layer.receive(1, StoreRecord(n + 1, net.node_id(1), key, item, 3), net.now)
    assert all(msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored))
    net.run_for(200.0)
    key, newer = sign_record(writer, b"kept", b"y2", 2)  # its writer keeps it by writing it again
    layer.receive(1, StoreRecord(9, net.node_id(1), key, newer, 3), net.now)
    net.run_for(100.0 + 2 * config.repair_interval_s)
    held = net.stores[0].record_keys()
    assert records[0][0] not in held and records[1][0] in held and records[2][0] in held
    net.run_for(300.0)
    assert set(net.stores[0].record_keys()) == {records[2][0]}
    assert layer.counters["records_collected"] == 2


def test_the_local_api_refuses_more_copies_than_the_cap():
    net = StorageNet(3, seed=14, config=CONFIG)
    try:
        net.persistence(0).put_blob(b"x", net.now, replicas=6)
    except ValueError as exc:
        assert "persistence.max_replicas" in str(exc)
    else:
        raise AssertionError("put_blob took 6 copies")


def test_trusted_data_evicts_a_strangers_when_the_store_is_full():
    net = StorageNet(3, seed=15, config=dataclasses.replace(CONFIG, stranger_share=1.0), strangers=frozenset({2}),
                     capacity_bytes=4 * CHUNK)
    layer = net.persistence(0)
    for n in range(4):
        key, data = chunk(150 + n)
        layer.receive(2, StoreChunk(n + 1, net.node_id(2), key, data, 3), net.now)
    assert net.stores[0].used_bytes() == 4 * CHUNK
    key, data = chunk(15)
    pin = sign_pin(net.identity_of(1), key, int(net.now + 3600))
    layer.receive(1, StoreChunk(9, net.node_id(1), key, data, 3, 0, pin), net.now)
    assert net.stores[0].chunk_info(key) is not None
    assert layer.counters["strangers_evicted"] == 1 and net.stores[0].used_bytes() == 4 * CHUNK


def test_a_strangers_record_counts_against_its_writers_quota():
    config = dataclasses.replace(CONFIG, stranger_quota_bytes=2 * MIN_CHARGE_BYTES + 100)
    net = StorageNet(3, seed=16, config=config)
    layer, writer = net.persistence(0), Identity.from_seed(bytes(range(5, 37)))
    for n in range(3):  # small records weigh MIN_CHARGE_BYTES each
        key, item = sign_record(writer, b"r%d" % n, bytes(40), 1)
        layer.receive(1, StoreRecord(n + 1, net.node_id(1), key, item, 3), net.now)
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored)] == [True, True, False]
    assert len(net.stores[0].record_keys()) == 2
    # a quorum record's value is weighed the same way: the writer's quota is used up
    key, item = sign_record(writer, b"q", bytes(40), 1)
    layer.receive(1, Accept(7, net.node_id(1), key, Ballot(1, net.node_id(1)), item,
                            [Contact(net.node_id(0), 0)]), net.now)
    (answer,) = [msg for _, msg in layer.messages_to_send() if isinstance(msg, Accepted)]
    assert not answer.ok and net.stores[0].read_acceptor(key) is None
    assert layer.counters["store_unauthorized"] == 2


def test_a_copy_that_claims_to_come_from_the_receiver_itself_is_refused():
    net = StorageNet(3, seed=19, config=CONFIG)
    layer = net.persistence(0)
    key, data = chunk(19)
    layer.receive(2, StoreChunk(1, net.node_id(0), key, data, 3), net.now)
    (reply,) = [msg for _, msg in layer.messages_to_send() if isinstance(msg, Stored)]
    assert not reply.ok and "claims this node's id" in reply.reason
    assert net.stores[0].chunk_info(key) is None


def test_a_flood_of_tiny_chunks_meets_the_quota_by_their_number():
    config = dataclasses.replace(CONFIG, stranger_quota_bytes=64 * MIN_CHARGE_BYTES)
    net = StorageNet(3, seed=20, config=config, strangers=frozenset({2}))
    layer, stranger = net.persistence(0), net.node_id(2)
    for n in range(64 + 10):
        data = n.to_bytes(4, "big")
        layer.receive(2, StoreChunk(n + 1, stranger, split(data, 16).chunks[0][0], data, 3), net.now)
    ok = [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored)]
    assert ok.count(True) == 64 and ok.count(False) == 10


def test_pins_expire_unless_their_publisher_keeps_the_blob_and_renews_them():
    config = dataclasses.replace(CONFIG, pin_ttl_s=600.0, unpinned_grace_s=300.0)
    net = StorageNet(12, seed=17, config=config)
    kept, dropped = blob(17), blob(18)
    assert store(net, 0, kept, keep=True).ok
    assert store(net, 1, dropped).ok
    net.run_for(1500.0)  # past the TTL and the grace
    for key in keys_of(dropped):
        assert net.holders(key) == [], "nobody renewed its pins: collected"
    for key in keys_of(kept):
        holders = [a for a in net.holders(key) if a != 0]
        assert len(holders) >= 2, key
        assert all(net.stores[a].chunk_info(key).pin.expires_at > net.now for a in holders)
    assert net.persistence(0).counters["pins_renewed"] > 0


def test_a_pin_for_a_chunk_held_already_is_renewed_by_store_pin():
    net = StorageNet(3, seed=18, config=CONFIG)
    layer, member = net.persistence(0), net.identity_of(1)
    key, data = chunk(18)
    layer.receive(1, StoreChunk(1, net.node_id(1), key, data, 3, 0, sign_pin(member, key, int(net.now + 100))), 0.0)
    newer = sign_pin(member, key, int(net.now + 5000))
    layer.receive(1, StorePin(2, net.node_id(1), key, newer), net.now)
    layer.receive(1, StorePin(3, net.node_id(1), key + 1, newer), net.now)
    assert [msg.ok for _, msg in layer.messages_to_send() if isinstance(msg, Stored)] == [True, True, False]
    assert net.stores[0].chunk_info(key).pin == newer


def test_memory_store_keeps_a_chunks_pin_owner_and_time():
    store_ = MemoryStore()
    key, data = chunk(19)
    pin = sign_pin(Identity.from_seed(bytes(32)), key, 100)
    assert store_.write_chunk(key, data, 3, pin=pin, owner=7, since=5.0) is None
    info = store_.chunk_info(key)
    assert (info.pin, info.owner, info.since) == (pin, 7, 5.0)
    store_.write_chunk(key, data, 4)  # a second copy keeps them
    assert store_.chunk_info(key).pin == pin and store_.chunk_info(key).replicas == 4
    store_.set_pin(key, None)
    assert store_.chunk_info(key).pin is None


def test_holders_that_trust_only_the_deployer_repair_its_blob_for_it():
    """No node trusts another's key, all trust the deployer's: the pins that travel with the
    copies let holders repair the deployer's blob between themselves."""
    deployer = Identity.from_seed(bytes(range(9, 41)))
    net = StorageNet(20, seed=21, config=CONFIG, strangers=frozenset(range(20)), trusting=frozenset({deployer.public_key}))
    data = blob(21)
    assert store(net, 0, data, signer=deployer).ok
    keys = keys_of(data)
    victims = {a for key in keys for a in net.holders(key)[:2]} - {0}
    for address in victims:
        net.crash(address)
    net.run_for(2.5 * CONFIG.repair_interval_s)
    for key in keys:
        assert {a for a in net.holders(key) if net.up(a)} == set(net.closest(key, 3)), key
    assert fetch(net, 0, keys[0]).data == data
