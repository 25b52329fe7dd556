"""Persistence on the trio runtime: 16 real nodes on 127.0.0.1 in one process, SQLite stores.

A 5 MiB bundle stored from one node is fetched byte-identical from every other node (chunks
travel over TCP streams); a chunk damaged on one node's disk is detected by its hash and
repaired from a replica. Waits poll with a generous bound; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.persistence import ChunkCorrupted, PersistenceConfig
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.node import kademlia_layer, persistence_layer
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.ping import PingProtocol
from p2pdeploy.runtime.node import open_node
from p2pdeploy.runtime.state_api import PersistenceClient
from p2pdeploy.runtime.store_sqlite import SQLiteStore

LOOPBACK = ("127.0.0.1", 0)
WAIT_BOUND_S = 60.0
FAST = KademliaConfig(k=8, rpc_timeout_s=2.0)
#: Sixteen nodes share one Python process: an answer may wait behind others' chunk transfers.
PERSISTENCE = PersistenceConfig(rpc_timeout_s=3.0, transfer_timeout_s=30.0)


#: The nodes of these tests form an open community: each keeps and repairs what any key signed.
OPEN = Contribution(trusted_keys="any")


def layers_with(store, config=PERSISTENCE, trusting=OPEN):
    def layers(context):
        overlay = kademlia_layer(context)
        with_store = dataclasses.replace(context, store=store, persistence=config, contribution=trusting)
        return [PingProtocol(context.identity.node_id, context.rng, own_address=context.address),
                overlay, persistence_layer(with_store, overlay)]

    return layers


async def wait_for(condition, timeout_s: float = WAIT_BOUND_S) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)
        return
    pytest.fail(f"condition still false after {timeout_s} s")


async def start_network(stack: AsyncExitStack, tmp_path, size: int):
    """``size`` nodes with SQLite stores. When the test ends they vanish (no hand-off: that is
    one node leaving a live network, tested on its own below, not a whole network stopping)."""
    stores = [stack.enter_context(SQLiteStore(tmp_path / f"node{i}", capacity_bytes=1 << 30, durable=False))
              for i in range(size)]
    first = await stack.enter_async_context(
        open_node(LOOPBACK, kademlia=FAST, seed=0, layers=layers_with(stores[0]), hand_off=False))
    nodes = [first]
    for index in range(1, size):
        nodes.append(await stack.enter_async_context(
            open_node(LOOPBACK, kademlia=FAST, seed=index, bootstrap=[first.address], layers=layers_with(stores[index]),
                      hand_off=False)
        ))
    for node in nodes:
        await node.wait_joined()
    return nodes, stores


async def test_a_5_mib_bundle_is_fetched_byte_identical_from_every_node_and_a_damaged_chunk_is_repaired(tmp_path):
    bundle = random.Random(5).randbytes(5 * 1024 * 1024)
    async with AsyncExitStack() as stack:
        nodes, stores = await start_network(stack, tmp_path, 16)
        clients = [PersistenceClient(node) for node in nodes]
        stored = await clients[0].put_blob(bundle)
        assert stored.ok and stored.replicas == 3 and stored.chunks == 20

        fetched: dict[int, bytes | None] = {}

        async def fetch(index: int) -> None:
            fetched[index] = await clients[index].get_blob(stored.blob_id)

        with trio.fail_after(WAIT_BOUND_S):
            async with trio.open_nursery() as nursery:
                for index in range(1, 16):
                    nursery.start_soon(fetch, index)
        assert sorted(fetched) == list(range(1, 16))
        digest = hashlib.sha256(bundle).digest()
        assert all(data is not None and hashlib.sha256(data).digest() == digest for data in fetched.values())

        # every chunk is on 3 disks; damage one copy and read the bundle through that node
        chunked = split(bundle, PERSISTENCE.chunk_bytes)
        key, piece = chunked.chunks[7]
        holders = [i for i, store in enumerate(stores) if store.chunk_info(key) is not None]
        assert len(holders) == 3
        victim = holders[0]
        path = stores[victim].path_of(hashlib.sha256(piece).digest())
        path.write_bytes(bytes(len(piece)))
        with nodes[victim].subscribe() as events:
            with trio.fail_after(WAIT_BOUND_S):
                assert await clients[victim].get_blob(stored.blob_id) == bundle
                async for event in events:
                    if event == ChunkCorrupted(key):
                        break
        await wait_for(lambda: stores[victim].chunk_info(key) is not None)
        assert path.read_bytes() == piece and stores[victim].read_chunk(key) == piece
        assert stores[victim].corruptions == 1


def identity_closest_to(key: int, within_bits: int = 150) -> Identity:
    """A deterministic identity whose id is within 2^within_bits of ``key``: closer than any
    random id of a small network (about 2^157 away), so it is the key's closest node."""
    for n in range(1 << 20):
        identity = Identity.from_seed(n.to_bytes(32, "big"))
        if identity.node_id ^ key < 1 << within_bits:
            return identity
    raise AssertionError("no identity found")


async def test_a_node_leaving_gracefully_hands_its_only_copies_to_the_nodes_now_closest(tmp_path):
    blob = random.Random(8).randbytes(900_000)  # four chunks and a manifest
    key = split(blob, PERSISTENCE.chunk_bytes).chunks[0][0]
    async with AsyncExitStack() as stack:
        nodes, stores = await start_network(stack, tmp_path, 5)
        async with AsyncExitStack() as leaving:
            own = leaving.enter_context(SQLiteStore(tmp_path / "leaver", capacity_bytes=1 << 30, durable=False))
            leaver = await leaving.enter_async_context(open_node(
                LOOPBACK, identity=identity_closest_to(key), kademlia=FAST, bootstrap=[nodes[0].address],
                layers=layers_with(own)))  # hand_off: the default
            await leaver.wait_joined()
            stored = await PersistenceClient(nodes[1]).put_blob(blob, replicas=1)
            assert stored.ok
            assert own.chunk_info(key) is not None, "the leaver is the closest node to the chunk: its one copy"
            assert all(store.chunk_info(key) is None for store in stores)
        # The block ended: the leaver handed its keys on before it stopped.
        assert [store.chunk_info(key) is not None for store in stores].count(True) == 1
        with trio.fail_after(WAIT_BOUND_S):
            assert await PersistenceClient(nodes[3]).get_blob(stored.blob_id) == blob


async def test_a_restarted_node_serves_what_its_data_directory_held(tmp_path):
    data_dir = tmp_path / "keeper"
    blob = random.Random(6).randbytes(600_000)
    with SQLiteStore(data_dir, capacity_bytes=1 << 30) as store:
        async with open_node(LOOPBACK, data_dir=data_dir, kademlia=FAST, layers=layers_with(store)) as alone:
            stored = await PersistenceClient(alone).put_blob(blob)  # alone: every copy is its own
            assert stored.ok and stored.replicas == 1
            keeper_id = alone.node_id
    async with AsyncExitStack() as stack:
        others, _ = await start_network(stack, tmp_path / "others", 3)
        store = stack.enter_context(SQLiteStore(data_dir, capacity_bytes=1 << 30))
        keeper = await stack.enter_async_context(open_node(
            LOOPBACK, data_dir=data_dir, kademlia=FAST, bootstrap=[others[0].address], layers=layers_with(store)))
        await keeper.wait_joined()
        assert keeper.node_id == keeper_id
        with trio.fail_after(WAIT_BOUND_S):
            assert await PersistenceClient(others[2]).get_blob(stored.blob_id) == blob


DEPLOYER = Identity.from_seed(bytes(range(40, 72)))


async def test_a_deployers_blob_put_succeeds_while_a_stranger_floods_every_store(tmp_path):
    """Four nodes trusting one deployer, 4 MiB stores; a stranger's node stores 6 MiB asking
    for 5 copies (every other node), then the deployer's node puts a blob."""
    trusting = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    capacity = 4 * 1024 * 1024
    async with AsyncExitStack() as stack:
        stores = [stack.enter_context(SQLiteStore(tmp_path / f"node{i}", capacity_bytes=capacity, durable=False))
                  for i in range(6)]
        first = await stack.enter_async_context(open_node(
            LOOPBACK, kademlia=FAST, seed=0, layers=layers_with(stores[0], trusting=trusting), hand_off=False))
        nodes = [first]
        for index in range(1, 4):
            nodes.append(await stack.enter_async_context(open_node(
                LOOPBACK, kademlia=FAST, seed=index, bootstrap=[first.address],
                layers=layers_with(stores[index], trusting=trusting), hand_off=False)))
        stranger = await stack.enter_async_context(open_node(
            LOOPBACK, kademlia=FAST, seed=4, bootstrap=[first.address], layers=layers_with(stores[4]), hand_off=False))
        deployer = await stack.enter_async_context(open_node(
            LOOPBACK, identity=DEPLOYER, kademlia=FAST, seed=5, bootstrap=[first.address],
            layers=layers_with(stores[5], trusting=trusting), hand_off=False))
        for node in [*nodes, stranger, deployer]:
            await node.wait_joined()
        await wait_for(lambda: all(len(n._overlay_or_none().table) >= 5 for n in [*nodes, stranger, deployer]))

        flood = await PersistenceClient(stranger).put_blob(random.Random(1).randbytes(6 * 1024 * 1024), replicas=5)
        assert not flood.ok and "not authorized" in flood.reason
        for store in stores[:4]:
            assert store.used_bytes() <= capacity // 10
        blob = random.Random(2).randbytes(1024 * 1024)
        stored = await PersistenceClient(deployer).put_blob(blob)
        assert stored.ok and stored.replicas == 3, stored.reason
        with trio.fail_after(WAIT_BOUND_S):
            assert await PersistenceClient(nodes[2]).get_blob(stored.blob_id) == blob
