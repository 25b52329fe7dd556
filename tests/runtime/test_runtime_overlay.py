"""The Kademlia overlay on the trio runtime: many real nodes on 127.0.0.1 in one process.

The facade (``lookup``, ``put``, ``get``, ``put_item``, ``get_item``), the join through
bootstrap addresses, and the routing snapshot that lets a restarted node rejoin without them.
Waits poll with a generous bound; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy import api, wire
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig, RoutingSnapshot
from p2pdeploy.overlay.ping import PingProtocol
from p2pdeploy.overlay.storage import Item, sign_record
from p2pdeploy.runtime.node import NodeNotRunning, NoOverlay, RuntimeConfig, open_node
from p2pdeploy.runtime.snapshot import ROUTING_SNAPSHOT_FILE

LOOPBACK = ("127.0.0.1", 0)
WAIT_BOUND_S = 20.0
#: Short timeouts: a lost answer on loopback is a bug, not a slow network.
#: Every node answers: a generous RPC timeout, so a loaded machine's slow answer is not a lost one.
FAST = KademliaConfig(k=8, rpc_timeout_s=5.0)
#: For the test that contacts a stopped node on purpose.
QUICK_TO_FAIL = KademliaConfig(k=8, rpc_timeout_s=1.0)


async def wait_for(condition, timeout_s: float = WAIT_BOUND_S) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)
        return
    pytest.fail(f"condition still false after {timeout_s} s")


async def start_network(stack: AsyncExitStack, size: int, config: KademliaConfig = FAST, **kwargs):
    """``size`` nodes; the first starts the community, each other joins through it."""
    first = await stack.enter_async_context(open_node(LOOPBACK, kademlia=config, seed=0, **kwargs))
    nodes = [first]
    for index in range(1, size):
        node = await stack.enter_async_context(
            open_node(LOOPBACK, kademlia=config, bootstrap=[first.address], seed=index)
        )
        nodes.append(node)
    for node in nodes:
        await node.wait_joined()
    return nodes


async def test_32_nodes_in_one_process_store_and_find_each_others_values():
    async with AsyncExitStack() as stack:
        nodes = await start_network(stack, 32)
        assert all(node.overlay_joined is not None and node.overlay_joined.ok for node in nodes[1:])
        keys = [api.key_for(f"value of node {i}") for i in range(32)]

        stored: dict[int, int] = {}

        async def put(i: int) -> None:
            stored[i] = await nodes[i].put(keys[i], b"value %d" % i)

        async with trio.open_nursery() as puts:
            for i in range(32):
                puts.start_soon(put, i)
        assert all(count >= FAST.k for count in stored.values()), stored

        got: dict[tuple[int, int], bytes | None] = {}

        async def get(reader: int, i: int) -> None:
            got[reader, i] = await nodes[reader].get(keys[i])

        # every value from a few nodes, and each node reads at least one value it did not write
        pairs = [(reader, i) for reader in (0, 13, 31) for i in range(32)]
        pairs += [(reader, (reader * 7 + 3) % 32) for reader in range(32)]
        async with trio.open_nursery() as gets:
            for reader, i in pairs:
                gets.start_soon(get, reader, i)
        assert got == {(reader, i): b"value %d" % i for reader, i in pairs}

        # lookups find the k closest by XOR, sorted, from any node
        everyone = {node.node_id: node.address for node in nodes}
        rng = random.Random(7)
        for _ in range(40):
            source = rng.choice(nodes)
            target = rng.getrandbits(160)
            found = await source.lookup(target)
            ids = [contact.node_id for contact in found]
            truth = sorted((i for i in everyone if i != source.node_id), key=lambda i: i ^ target)[: FAST.k]
            assert ids == sorted(ids, key=lambda i: i ^ target)
            assert ids == truth
            assert all(contact.address == everyone[contact.node_id] for contact in found)
        assert await nodes[5].get(api.key_for("nobody stored this")) is None


async def test_signed_records_through_the_facade_highest_sequence_wins():
    async with AsyncExitStack() as stack:
        nodes = await start_network(stack, 6)
        writer = Identity.from_seed(bytes(range(32)))
        key, first = sign_record(writer, b"service/wiki", b"v1", 1)
        assert await nodes[1].put_item(key, first) >= 1
        key, second = sign_record(writer, b"service/wiki", b"v2", 2)
        assert await nodes[2].put_item(key, second) >= 1
        assert await nodes[4].get_item(key, latest=True) == second
        assert await nodes[5].get(key) == b"v2"
        with pytest.raises(ValueError, match="does not match"):
            await nodes[1].put_item(key + 1, second)
        forged = Item(b"evil", second.public_key, second.name, 3, second.signature)
        with pytest.raises(ValueError, match="bad signature"):
            await nodes[1].put_item(key, forged)


async def test_the_facade_names_what_was_wrong():
    async with open_node(LOOPBACK, kademlia=FAST) as node:
        with pytest.raises(TypeError, match="key_for"):
            await node.get("greeting")
        with pytest.raises(ValueError, match=r"\[0, 2\*\*160\)"):
            await node.lookup(1 << 160)
        with pytest.raises(TypeError, match="encode text first"):
            await node.put(1, "text")
        with pytest.raises(ValueError, match="over the limit"):
            await node.put(1, bytes(FAST.max_value_bytes + 1))
        with pytest.raises(ValueError, match="ttl_s must be in"):
            await node.put(1, b"x", ttl_s=0)
        # alone, a node stores on itself and finds its own value
        assert await node.put(2, b"mine") == 1
        assert await node.get(2) == b"mine"
    with pytest.raises(NodeNotRunning):
        await node.get(2)

    def ping_only(context):
        return [PingProtocol(context.identity.node_id, context.rng)]

    async with open_node(LOOPBACK, layers=ping_only) as node:
        with pytest.raises(NoOverlay, match="no Kademlia overlay"):
            await node.lookup(1)


async def test_a_restarted_node_rejoins_through_its_saved_routing_table_without_bootstrap(tmp_path):
    data_dir = tmp_path / "node"
    async with AsyncExitStack() as stack:
        nodes = await start_network(stack, 5, QUICK_TO_FAIL)
        async with open_node(LOOPBACK, data_dir=data_dir, kademlia=QUICK_TO_FAIL, bootstrap=[nodes[0].address]) as node:
            await node.wait_joined()
            node_id = node.node_id
            assert node.overlay_joined.contacts == 5
            # saved right after the join, before any shutdown
            await wait_for(lambda: (data_dir / ROUTING_SNAPSHOT_FILE).exists())
        snapshot = wire.decode((data_dir / ROUTING_SNAPSHOT_FILE).read_bytes(), limit_bytes=1 << 20)
        assert isinstance(snapshot, RoutingSnapshot) and snapshot.node_id == node_id
        assert sorted(c.node_id for c in snapshot.contacts) == sorted(n.node_id for n in nodes)
        assert not list(data_dir.glob(".*.tmp"))  # written through a temporary file, renamed

        key = api.key_for("kept while the node was away")
        assert await nodes[3].put(key, b"still here") >= 1

        async with open_node(LOOPBACK, data_dir=data_dir, kademlia=QUICK_TO_FAIL) as again:  # no bootstrap
            assert again.node_id == node_id and again.restored_contacts == 5
            await again.wait_joined()
            assert again.overlay_joined.ok
            assert key not in again.overlay.store  # stored while it was away: the value comes from the network
            assert await again.get(key) == b"still here"
            # the others learn its new address from its join
            await wait_for(lambda: all(n.overlay.table.get(node_id).address == again.address for n in nodes))


async def test_the_snapshot_is_saved_periodically_and_a_corrupt_one_is_ignored(tmp_path):
    data_dir = tmp_path / "node"
    path = data_dir / ROUTING_SNAPSHOT_FILE
    config = RuntimeConfig(kademlia=FAST, snapshot_interval_s=0.05)
    async with open_node(LOOPBACK, kademlia=FAST) as peer:
        async with open_node(LOOPBACK, data_dir=data_dir, config=config, bootstrap=[peer.address]) as node:
            await node.wait_joined()
            await wait_for(lambda: node.counters["snapshots_saved"] >= 1)
            path.unlink()
            saved = node.counters["snapshots_saved"]
            await wait_for(lambda: node.counters["snapshots_saved"] >= saved + 2)  # one saving now, one more
            assert path.exists() and node.counters["snapshot_errors"] == 0
        path.write_bytes(b"\xff not a snapshot")
        async with open_node(LOOPBACK, data_dir=data_dir, config=config) as again:
            assert again.restored_contacts == 0
            await again.wait_joined()
        # a node that saw nobody leaves the old file alone rather than saving an empty table
        assert path.read_bytes() == b"\xff not a snapshot"
