"""The overlay's durable store on the trio runtime: real nodes on 127.0.0.1, one of them with a
data directory, stopped and started again.

A node restarted with its data directory and none of its peers answering serves the values it
held for others and the ones it published, but not one whose TTL ran out while it was down;
a restarted publisher republishes what it published (even a value whose last copy expired
while it was away). Waits poll with a generous bound; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy import api
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.runtime.node import open_node
from p2pdeploy.runtime.overlay_store import OVERLAY_DATABASE_FILE

LOOPBACK = ("127.0.0.1", 0)
WAIT_BOUND_S = 30.0
#: Lookups towards the stopped peers fail after a second.
QUICK_TO_FAIL = KademliaConfig(k=8, rpc_timeout_s=1.0)


async def wait_for(condition, timeout_s: float = WAIT_BOUND_S) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)
        return
    pytest.fail(f"condition still false after {timeout_s} s")


def keys_in_file(data_dir) -> set[int]:
    db = sqlite3.connect(data_dir / OVERLAY_DATABASE_FILE)
    try:
        return {int.from_bytes(row[0], "big") for row in db.execute("SELECT key FROM items")}
    finally:
        db.close()


async def test_a_node_restarted_with_its_data_directory_and_no_peers_serves_what_it_held(tmp_path):
    data_dir = tmp_path / "node"
    published = api.key_for("published by the restarted node")
    held = api.key_for("held for a peer")
    short = api.key_for("expires while the node is down")
    async with AsyncExitStack() as peers:
        seed = await peers.enter_async_context(open_node(LOOPBACK, kademlia=QUICK_TO_FAIL, seed=1))
        other = await peers.enter_async_context(
            open_node(LOOPBACK, kademlia=QUICK_TO_FAIL, bootstrap=[seed.address], seed=2))
        await other.wait_joined()
        async with open_node(LOOPBACK, data_dir=data_dir, kademlia=QUICK_TO_FAIL, bootstrap=[seed.address],
                             hand_off=False) as node:
            await node.wait_joined()
            node_id = node.node_id
            assert await node.put(published, b"mine", ttl_s=3600.0) == 3
            assert await other.put(held, b"theirs", ttl_s=3600.0) == 3  # all three are among the k closest
            assert await other.put(short, b"brief", ttl_s=2.0) == 3
            short_stored_at = time.time()
            assert {published, held, short} <= set(dict(node.overlay.store.items()))
        assert {published, held, short} <= keys_in_file(data_dir)  # on disk when the node stopped
    # the peers are gone; the short value's time runs out while the node is down
    await wait_for(lambda: time.time() > short_stored_at + 2.5)

    async with open_node(LOOPBACK, data_dir=data_dir, kademlia=QUICK_TO_FAIL, hand_off=False) as again:
        assert again.node_id == node_id and again.restored_contacts == 2
        # every other node is stopped: these answers can only come from its own store
        assert await again.get(published) == b"mine"
        assert await again.get(held) == b"theirs"
        assert short not in again.overlay.store
        assert await again.get(short) is None  # not served: its holders are down and its copy expired
        assert published in again.overlay.published
    assert short not in keys_in_file(data_dir)


async def test_a_restarted_publisher_republishes_even_a_value_whose_last_copy_expired(tmp_path):
    data_dir = tmp_path / "publisher"
    config = KademliaConfig(k=8, rpc_timeout_s=1.0, republish_interval_s=1.0)
    key = api.key_for("republished after a restart")
    async with open_node(LOOPBACK, data_dir=data_dir, kademlia=config, hand_off=False) as alone:
        assert await alone.put(key, b"again and again", ttl_s=2.0) == 1  # nobody else to hold it
    stopped_at = time.time()
    await wait_for(lambda: time.time() > stopped_at + 2.5)  # its only copy has expired now
    async with AsyncExitStack() as stack:
        peer = await stack.enter_async_context(open_node(LOOPBACK, kademlia=config))
        publisher = await stack.enter_async_context(
            open_node(LOOPBACK, data_dir=data_dir, kademlia=config, bootstrap=[peer.address], hand_off=False))
        assert key not in publisher.overlay.store and key in publisher.overlay.published
        assert key not in peer.overlay.store
        # nothing to hand off: the peer can only get it from the publisher's republish
        await wait_for(lambda: key in peer.overlay.store)
        assert await peer.get(key) == b"again and again"
