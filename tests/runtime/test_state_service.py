"""A service's state follows the service: the state API's namespace of a replica its manager
started is the service ``NAME@OWNER``, whose records every host of the service shares."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy.collective.deployment_messages import ServiceId
from p2pdeploy.collective.records import shared_record_key
from p2pdeploy.collective.stateapi import StateError, StateRequest, record_name, service_namespace
from p2pdeploy.fabric.contribution import ANY, Contribution
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.protocol import ManagedReplica, StatusReply
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.node import open_node
from p2pdeploy.runtime.state_api import StateServer, replica_namespace

from .test_runtime_replicas import BOUND_S, DEPLOYER, EXAMPLES, FAST_OVERLAY, http_body, wait_until_running
from .test_state_api import http, running_state_api

OWNER = Identity.from_seed(bytes(range(40, 72)))
MANAGER = Identity.from_seed(bytes(range(72, 104)))


def test_a_service_namespace_is_name_at_owner_and_names_the_services_records():
    namespace = service_namespace("hello", OWNER.public_key)
    assert namespace == "hello@" + OWNER.public_key.hex()
    assert record_name(namespace, "counter", service=True) == b"svcstate/%s/hello/counter" % OWNER.public_key.hex().encode()
    assert StateRequest("get", namespace, "counter", service=True).service
    for bad in ("hello", "hello@" + "00" * 31, "Hello@" + "00" * 32, "hello@" + "AB" * 32):
        with pytest.raises(StateError, match="NAME@OWNER"):
            record_name(bad, "k", service=True)


def test_a_replica_its_services_manager_started_gets_the_services_namespace():
    service = ServiceId("hello", OWNER.public_key)
    managed = ManagedReplica(service.key, ("127.0.0.1", 1), MANAGER.node_id, "hello", OWNER.public_key)
    assert replica_namespace("hello", "hello-1", MANAGER.public_key, managed) == (
        f"hello@{OWNER.public_key.hex()}", True)
    # started by hand: the starter's namespace on this node, as before
    assert replica_namespace("hello", "hello-1", MANAGER.public_key, None) == (
        f"hello@{MANAGER.public_key.hex()}", False)
    # a start whose service is not the bundle signer's service of that name gets no one's shared state
    other = ManagedReplica(ServiceId("other", OWNER.public_key).key, ("127.0.0.1", 1), MANAGER.node_id, "hello",
                           OWNER.public_key)
    assert replica_namespace("hello", "hello-1", MANAGER.public_key, other) == (
        f"hello@{MANAGER.public_key.hex()}", False)
    assert replica_namespace("", "r-1", b"", None) == ("r-1", False)


async def test_what_one_host_of_a_service_writes_another_host_reads(tmp_path):
    """Two nodes, each signing with its own key, reach the same records through their state
    APIs for one service (a replacement replica reads what the failed one wrote); another
    owner's service of the same name does not see them."""
    async with AsyncExitStack() as stack:
        nodes, nursery, _, _ = await running_state_api(stack, tmp_path)
        first, second = StateServer(nodes[2]), StateServer(nodes[4])
        await nursery.start(first.run)
        await nursery.start(second.run)
        namespace = service_namespace("hello", OWNER.public_key)
        a = first.register(namespace, service=True)
        b = second.register(namespace, service=True)
        elsewhere = second.register(service_namespace("hello", MANAGER.public_key), service=True)
        per_node = second.register(namespace)  # the same text as a node's own namespace: not shared
        with trio.fail_after(60):
            assert (await http(a.url + "counter", "PUT", a.token, b"41"))[0] == 200
            status, headers, body = await http(b.url + "counter", "GET", b.token)
            assert (status, headers["x-version"], body) == (200, "1", b"41")
            status, headers, _ = await http(b.url + "counter", "PUT", b.token, b"42", {"If-Match": "1"})
            assert (status, headers["x-version"]) == (200, "2")
            status, headers, body = await http(a.url + "counter", "GET", a.token)
            assert (status, headers["x-version"], body) == (200, "2", b"42")
            assert (await http(elsewhere.url + "counter", "GET", elsewhere.token))[0] == 404
            assert (await http(per_node.url + "counter", "GET", per_node.token))[0] == 404


async def test_a_replacement_replica_on_another_node_reads_the_state_the_killed_one_wrote(service_root):
    """A manager starts examples/hello for the service hello@DEPLOYER on one host, which counts
    /count to 2 in the state API; the host goes away; the replacement the manager starts on
    another host goes on counting from 2. Each host signs with its own key; the community
    trusts every key (an open one), as it must for managers' starts to run."""
    open_community = Contribution(trusted_keys=ANY)
    bundle = bundle_from_directory(EXAMPLES / "hello").sign(DEPLOYER)
    service = ServiceId("hello", DEPLOYER.public_key)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        first_scope, first_gone = trio.CancelScope(), trio.Event()

        async def run_first(*, task_status=trio.TASK_STATUS_IGNORED):
            try:
                with first_scope:
                    async with open_node(data_dir=service_root / "first", contribution=open_community,
                                         kademlia=FAST_OVERLAY) as node:
                        task_status.started(node)
                        await trio.sleep_forever()
            finally:
                first_gone.set()

        first = await nursery.start(run_first)
        second = await stack.enter_async_context(open_node(
            seed=1, data_dir=service_root / "second", contribution=open_community, kademlia=FAST_OVERLAY,
            bootstrap=[first.address]))
        others = [await stack.enter_async_context(open_node(
            seed=10 + i, contribution=open_community, kademlia=FAST_OVERLAY, bootstrap=[first.address]))
            for i in range(3)]
        manager = await stack.enter_async_context(
            open_node(identity=DEPLOYER, layers=client_layers, bootstrap=[first.address]))
        for node in (first, second, *others):
            await node.wait_joined()

        async def start(host, replica_id: str) -> int:
            reply = await manager.remote_request(
                host.address, lambda c, a, n, now: c.start(a, n, replica_id, bundle, now, service=(service.key, "hello")))
            assert isinstance(reply, StatusReply), reply
            return (await wait_until_running(manager, host.address, replica_id)).port

        port = await start(first, "hello-1")
        assert (await http_body(port, "/count")).startswith(b"count 1 (version 1)")
        assert (await http_body(port, "/count")).startswith(b"count 2 (version 2)")
        first_scope.cancel()  # the host and its replica are gone
        with trio.fail_after(BOUND_S):
            await first_gone.wait()

        port = await start(second, "hello-2")
        assert (await http_body(port, "/count")).startswith(b"count 3 (version 3)")
        with trio.fail_after(BOUND_S):
            read = await others[0].persistence.quorum_read(shared_record_key(
                record_name(service_namespace("hello", DEPLOYER.public_key), "count", service=True)))
        assert read.ok and read.item.value == b"3" and read.item.public_key == second.identity.public_key
