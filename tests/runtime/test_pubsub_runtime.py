"""Publish/subscribe on the trio runtime: 16 real nodes on 127.0.0.1 in one process.

Every node runs the default layers (the overlay, multicast and pub/sub among them) and is
driven through the node's facade (``node.events``, ``node.publish``). Waits poll with a
generous bound.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy.collective.filters import Filter, event_attributes
from p2pdeploy.collective.pubsub import Delivered
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.multicast import Multicast
from p2pdeploy.runtime.node import open_node

LOOPBACK = ("127.0.0.1", 0)
WAIT_BOUND_S = 30.0
FAST = KademliaConfig(k=8, rpc_timeout_s=1.0)


async def wait_for(condition, timeout_s: float = WAIT_BOUND_S) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)
        return
    pytest.fail(f"condition still false after {timeout_s} s")


FILTERS = {
    2: 'service == "wiki" and state in {"failed", "stopped"}',
    7: "memory_free >= 2G",
    11: '"gpu" in tags',
}
EVENTS = [
    {"service": "wiki", "state": "failed", "replica": "wiki-1"},
    {"service": "wiki", "state": "running", "replica": "wiki-2"},
    {"service": "db", "state": "stopped", "replica": "db-1"},
    {"kind": "node_joined", "memory_free": 3 * 1024**3, "tags": frozenset({"gpu", "ssd"})},
    {"kind": "node_joined", "memory_free": 512 * 1024**2, "tags": frozenset({"ssd"})},
    {"service": "wiki", "state": "starting", "memory_free": 8 * 1024**3},
    # the last event matches every filter: once it arrived, everything before it from that
    # publisher has been delivered (per-publisher order), so "exactly" can be checked
    {"service": "wiki", "state": "stopped", "memory_free": 4 * 1024**3, "tags": frozenset({"gpu"})},
]


async def test_a_subscriber_receives_exactly_the_matching_events_on_a_real_16_node_network():
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(LOOPBACK, kademlia=FAST, seed=0))
        nodes = [first]
        for index in range(1, 16):
            nodes.append(await stack.enter_async_context(
                open_node(LOOPBACK, kademlia=FAST, seed=index, bootstrap=[first.address])))
        for node in nodes:
            await node.wait_joined()

        received: dict[int, list[Delivered]] = {index: [] for index in FILTERS}
        subscriptions: dict[int, int] = {}
        async with AsyncExitStack() as feeds, trio.open_nursery() as nursery:
            async def collect(index: int, stream) -> None:
                async for event in stream:
                    received[index].append(event)

            for index in FILTERS:
                subscriptions[index], stream_ = await feeds.enter_async_context(
                    nodes[index].events("replicas", FILTERS[index]))
                nursery.start_soon(collect, index, stream_)
            await wait_for(lambda: all(nodes[i].pubsub.is_active(s) for i, s in subscriptions.items()))
            # the root tells the other members about each new one a moment later (view_push_delay_s)
            subscriber_ids = {nodes[i].node_id for i in FILTERS}
            await wait_for(lambda: all({c.node_id for c in nodes[i].core.layer(Multicast).view("pubsub/replicas")}
                                       == subscriber_ids - {nodes[i].node_id} for i in FILTERS))

            publishers = (5, 2)  # one outside the group, one that is a subscriber itself
            for n, attributes in enumerate(EVENTS):
                for publisher in publishers:
                    nodes[publisher].publish("replicas", attributes, reliable=n % 2 == 1)
                    await trio.sleep(0)

            ids = {p: nodes[p].node_id for p in publishers}
            await wait_for(lambda: all(
                {e.publisher for e in received[i] if e.sequence == len(EVENTS)} == set(ids.values())
                for i in FILTERS))
            nursery.cancel_scope.cancel()

        for index, source in FILTERS.items():
            matching = [event_attributes(a) for a in EVENTS if Filter.parse(source).matches(event_attributes(a))]
            for publisher, node_id in ids.items():
                mine = [e for e in received[index] if e.publisher == node_id]
                assert [e.attributes for e in mine] == matching, (index, publisher)
                assert [e.sequence for e in mine] == sorted(e.sequence for e in mine)  # in publishing order
                assert {e.subscription_id for e in mine} == {subscriptions[index]}
