"""Repair that does not wait for the next round: holders watch one another, a node back with
its disk checks what it holds at once.

Under heavy-tailed (Weibull) churn many sessions end within minutes, so all the holders of a
key can leave within one repair interval, and a node back from a long downtime may hold the
last copy and leave again soon. Each test reproduces one such loss on a small ``StorageNet``
with repair rounds far apart (``repair_interval_s`` = 600 s), so only these mechanisms can
save the blob.
"""

from __future__ import annotations

import random

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.persistence import (
    BlobFetched,
    BlobStored,
    HolderPing,
    MemoryStore,
    PersistenceConfig,
)
from tests.simnet import StorageNet

CONFIG = PersistenceConfig(chunk_bytes=4096, repair_interval_s=600.0)


def put(net: StorageNet, address: int, data: bytes, replicas: int = 3) -> list[int]:
    query = net.call(address, lambda p, now: p.put_blob(data, now, replicas=replicas))
    assert net.result(address, query, BlobStored).ok
    chunked = split(data, CONFIG.chunk_bytes, replicas)
    return [chunked.blob_id, *dict(chunked.chunks)]


def lose_for_good(net: StorageNet, address: int) -> None:
    """The machine is gone with its disk."""
    net.crash(address)
    net.stores[address] = MemoryStore()


def live_holders(net: StorageNet, key: int) -> list[int]:
    return [a for a in net.holders(key) if net.up(a)]


def test_holders_that_leave_for_good_one_after_another_within_a_repair_interval_are_replaced():
    net = StorageNet(24, seed=11, config=CONFIG)
    data = random.Random(11).randbytes(12_000)
    keys = put(net, 0, data)
    net.run_for(1.6 * CONFIG.repair_interval_s)  # every key checked once: its holders know one another
    original = {a for key in keys for a in net.holders(key)} - {0}
    assert original
    for address in sorted(original, key=lambda a: net.node_id(a)):  # 15 s apart, 600 s between rounds
        lose_for_good(net, address)
        net.run_for(15.0)
        for key in keys:  # one copy short waits for the round; a second loss is repaired at once
            assert len(live_holders(net, key)) >= 2, f"{key:040x} has {live_holders(net, key)}"
    net.run_for(15.0)
    reader = next(a for a in range(24) if net.up(a))
    query = net.call(reader, lambda p, now: p.get_blob(keys[0], now))
    assert net.result(reader, query, BlobFetched).data == data
    counters = [net.persistence(a).counters for a in range(24) if net.up(a)]
    assert sum(c["checks_triggered"] for c in counters) >= len(keys)
    net.run_for(CONFIG.repair_interval_s)  # the next round brings every key back to r copies
    for key in keys:
        assert len(live_holders(net, key)) >= 3, f"{key:040x} has {live_holders(net, key)}"


def test_a_holder_down_for_a_moment_costs_no_copy_before_the_next_round():
    net = StorageNet(24, seed=14, config=CONFIG)
    keys = put(net, 0, random.Random(14).randbytes(12_000))
    net.run_for(1.6 * CONFIG.repair_interval_s)  # every key checked once: its holders know one another
    copies = sum(len(net.holders(key)) for key in keys)
    rebooted = next(a for a in range(1, 24) if any(a in net.holders(key) for key in keys))
    net.crash(rebooted)  # a reboot: down for 30 s, back with its disk
    net.run_for(30.0)
    net.restart(rebooted)
    net.run_for(30.0)
    assert sum(len(net.holders(key)) for key in keys) == copies  # nobody copied what it still held
    counters = [net.persistence(a).counters for a in range(24)]
    assert sum(c["probes_unanswered"] for c in counters) > 0  # its peers did notice it was gone


def test_a_node_back_with_the_last_copy_replicates_it_within_seconds():
    net = StorageNet(16, seed=12, config=CONFIG)
    data = random.Random(12).randbytes(3000)  # one chunk and the manifest
    keys = put(net, 0, data, replicas=2)
    holders = {a for key in keys for a in net.holders(key)}
    survivor = max(holders, key=lambda a: sum(a in net.holders(key) for key in keys))
    kept = [key for key in keys if survivor in net.holders(key)]
    net.crash(survivor)  # down, disk kept
    for address in holders - {survivor}:
        lose_for_good(net, address)
    net.run_for(5.0)
    assert all(net.holders(key) == [survivor] for key in kept)  # the last copies, on a node that is down
    net.restart(survivor)
    net.run_for(10.0)  # far less than a repair interval
    for key in kept:
        assert len(live_holders(net, key)) >= 2, f"{key:040x} has {live_holders(net, key)}"


def test_one_ping_per_peer_however_many_keys_two_nodes_share():
    net = StorageNet(5, seed=13, config=CONFIG)  # r = 3 of 5 nodes: every key on many of the same nodes
    for seed in range(6):
        put(net, seed % 5, random.Random(seed).randbytes(9000))
    net.run_for(1.6 * CONFIG.repair_interval_s)
    sent: list[tuple[int, int]] = []
    for address in range(5):
        core = net.sim.hosts[address].core
        assert core is not None
        original = core.messages_to_send

        def spy(original=original, address=address):
            out = original()
            sent.extend((address, dst) for dst, msg in out if type(msg) is HolderPing)
            return out

        core.messages_to_send = spy  # type: ignore[method-assign]
    net.run_for(CONFIG.watch_interval_s)
    assert sent, "holders ping one another"
    assert len(sent) == len(set(sent)), "a peer is pinged once a round, not once per key"
    assert all(net.persistence(a).counters["checks_triggered"] == 0 for a in range(5))  # nobody left
