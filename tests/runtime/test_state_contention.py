"""Many clients of one key in the state API: concurrent reads all succeed, and compare-and-set
increments from many clients of examples/hello end exactly where they should.

Reads peek at the key's group instead of running a ballot each (collective/persistence_quorum.py),
so they neither fail one another nor the writers; a writer that loses a ballot backs off and
retries within its request's deadline.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.protocol import StatusReply
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.node import open_node

from .test_runtime_replicas import EXAMPLES, FAST_OVERLAY, http_get, wait_until_running
from .test_state_api import http, running_state_api

READERS = 200
BOUND_S = 120.0


async def test_two_hundred_concurrent_gets_of_one_key_all_succeed(tmp_path):
    async with AsyncExitStack() as stack:
        _, _, base, token = await running_state_api(stack, tmp_path)
        url = base + "pages/home"
        with trio.fail_after(BOUND_S):
            assert (await http(url, "PUT", token, b"hello"))[0] == 200
            answers: list[tuple[int, bytes]] = []

            async def get() -> None:
                status, _, body = await http(url, "GET", token)
                answers.append((status, body))

            async with trio.open_nursery() as readers:
                for _ in range(READERS):
                    readers.start_soon(get)
        assert answers == [(200, b"hello")] * READERS


CLIENTS = 20
INCREMENTS = 10


async def test_twenty_clients_incrementing_the_hello_counter_ten_times_each_end_at_two_hundred(service_root):
    """examples/hello's /count reads the counter and writes it back with If-Match; twenty clients
    at once make its writes collide on every version, and each collision is retried until it lands."""
    deployer_identity = Identity.from_seed(b"H" * 32)
    bundle = bundle_from_directory(EXAMPLES / "hello").sign(deployer_identity)
    contribution = Contribution(trusted_keys=frozenset({deployer_identity.public_key}))
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(
            open_node(data_dir=service_root / "host", contribution=contribution, kademlia=FAST_OVERLAY))
        others = [await stack.enter_async_context(open_node(seed=i, bootstrap=[host.address],
                                                            kademlia=FAST_OVERLAY)) for i in range(4)]
        deployer = await stack.enter_async_context(open_node(identity=deployer_identity, layers=client_layers))
        for node in (host, *others):
            await node.wait_joined()
        assert isinstance(await deployer.remote_start(host.address, "hello-1", bundle), StatusReply)
        port = (await wait_until_running(deployer, host.address, "hello-1")).port
        answers: list[bytes] = []

        async def client() -> None:
            for _ in range(INCREMENTS):
                answers.append(await http_get(port, "/count"))

        with trio.fail_after(4 * BOUND_S):
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(client)
        bodies = [a.partition(b"\r\n\r\n")[2] for a in answers]
        assert all(body.startswith(b"count ") for body in bodies), [b for b in bodies if not b.startswith(b"count ")]
        counts = sorted(int(body.split()[1]) for body in bodies)
        assert counts == list(range(1, CLIENTS * INCREMENTS + 1))  # every increment once, none lost
