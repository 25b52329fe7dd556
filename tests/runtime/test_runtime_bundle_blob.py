"""Bundles by content id on real nodes: a deployer stores a bundle once as a blob and starts by its id.

Seven in-process nodes on 127.0.0.1 with data directories (SQLite stores, chunk files): a
deployer and six that host replicas. The target is a node that holds none of the bundle's
chunks, so it fetches them from the nodes that do; a second replica of the same bundle there
fetches nothing (the chunks are pinned in its store); a bundle whose chunk is damaged on every
holder's disk, and one signed by a key the node does not trust, fail their replica with the
reason, and the node keeps serving. Waits poll with a generous bound.
"""

from __future__ import annotations

import hashlib
import shutil
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.bundles import BundleFetcher
from p2pdeploy.collective.persistence import PersistenceConfig
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.resource.protocol import StatusReply
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.control import ControlSocket, ReplicaAnswer, ReplicaRequest, control_request
from p2pdeploy.runtime.node import RuntimeConfig, open_node

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOYER = Identity.from_seed(b"D" * 32)
STRANGER = Identity.from_seed(b"S" * 32)
BOUND_S = 60.0
FAST = KademliaConfig(k=8, rpc_timeout_s=2.0)
PERSISTENCE = PersistenceConfig(rpc_timeout_s=3.0, transfer_timeout_s=30.0)
#: The bundle is one chunk plus its blob manifest, 3 copies each (6 holders at most), and the
#: deployer and the warm-up host keep one too: with 8 hosts, one always holds none of it.
HOSTS = 8



def hello(root: Path, name: str, extra: bytes = b"") -> Path:
    service = root / name
    shutil.copytree(EXAMPLES / "hello", service)
    if extra:
        (service / "extra.txt").write_bytes(extra)
    return service


async def wait_for_state(client, address, replica_id, states) -> StatusReply:
    with trio.fail_after(BOUND_S):
        while True:
            reply = await client.remote_query(address, replica_id)
            assert isinstance(reply, StatusReply), reply
            if reply.state in states:
                return reply
            await trio.sleep(0.05)


def served(nodes) -> int:
    return sum(node.persistence.layer.counters["chunks_served"] for node in nodes)


async def test_replicas_started_by_blob_id_fetch_verify_and_cache_their_bundle(service_root):
    config = RuntimeConfig(persistence=PERSISTENCE)
    trusting = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    async with AsyncExitStack() as stack:
        deployer = await stack.enter_async_context(open_node(
            identity=DEPLOYER, data_dir=service_root / "deployer", kademlia=FAST, config=config, hand_off=False))
        hosts = []
        for index in range(HOSTS):
            hosts.append(await stack.enter_async_context(open_node(
                identity=Identity.from_seed(bytes([index + 1]) * 32), data_dir=service_root / f"host{index}",
                bootstrap=[deployer.address], kademlia=FAST, config=config, contribution=trusting, hand_off=False)))
        for node in (deployer, *hosts):
            await node.wait_joined()
        everyone = [deployer, *hosts]

        def holders(keys):
            return [n for n in everyone if any(n.persistence.layer.store.chunk_info(k) is not None for k in keys)]

        # -- a start by blob id fetches the bundle from the nodes that hold it, and it runs
        bundle = bundle_from_directory(hello(service_root, "hello")).sign(DEPLOYER)
        reply = await deployer.remote_start(hosts[0].address, "warm-up", bundle, by_blob=True)
        blob_id = split(bundle.data, PERSISTENCE.chunk_bytes, PERSISTENCE.replicas).blob_id
        keys = [blob_id, *dict(split(bundle.data, PERSISTENCE.chunk_bytes, PERSISTENCE.replicas).chunks)]
        assert len(keys) == 2
        await wait_for_state(deployer, hosts[0].address, "warm-up", ("running",))
        target = next((n for n in hosts if n not in holders(keys)), None)
        assert target is not None, "every host holds a chunk of the bundle"
        before = served(everyone)
        reply = await deployer.remote_start(target.address, "hello-1", bundle, by_blob=True)
        assert isinstance(reply, StatusReply) and reply.state == "fetching", reply
        running = await wait_for_state(deployer, target.address, "hello-1", ("running", "failed"))
        assert running.state == "running", running
        fetcher = target.core.layer(BundleFetcher)
        assert fetcher.counters["fetched"] == 1 and served(everyone) > before
        store = target.persistence.layer.store
        assert all(store.chunk_info(k) is not None and store.chunk_info(k).pinned for k in keys)

        # -- a second replica of the same bundle on that node fetches nothing
        before = served(everyone)
        reply = await deployer.remote_start(target.address, "hello-2", bundle, by_blob=True)
        assert isinstance(reply, StatusReply), reply
        second = await wait_for_state(deployer, target.address, "hello-2", ("running", "failed"))
        assert second.state == "running", second
        assert fetcher.counters["local"] == 1 and fetcher.counters["fetched"] == 1
        assert served(everyone) == before

        # -- a chunk damaged on every holder's disk: refused with the reason
        damaged = bundle_from_directory(hello(service_root, "hello-damaged", b"damaged\n")).sign(DEPLOYER)
        chunked = split(damaged.data, PERSISTENCE.chunk_bytes, PERSISTENCE.replicas)
        stored = await deployer.persistence.put_blob(damaged.data, keep=True)
        assert stored.ok and stored.blob_id == chunked.blob_id
        key, piece = chunked.chunks[0]
        victims = [n for n in everyone if n.persistence.layer.store.chunk_info(key) is not None]
        assert deployer in victims  # the deployer keeps its copy: every copy is damaged, the target's too if it has one
        for node in victims:
            node.persistence.layer.store.path_of(hashlib.sha256(piece).digest()).write_bytes(bytes(len(piece)))
        reply = await deployer.remote_start(target.address, "hello-3", damaged, by_blob=True)
        assert isinstance(reply, StatusReply) and reply.state == "fetching", reply
        failed = await wait_for_state(deployer, target.address, "hello-3", ("failed", "running"))
        assert failed.state == "failed" and failed.reason.startswith(f"bundle fetch failed: chunk {key:040x} not found")

        # -- a bundle signed by a key the node does not trust: refused with the reason
        strangers = bundle_from_directory(hello(service_root, "hello-stranger", b"stranger\n")).sign(STRANGER)
        reply = await deployer.remote_start(target.address, "hello-4", strangers, by_blob=True)
        assert isinstance(reply, StatusReply) and reply.state == "fetching", reply
        refused = await wait_for_state(deployer, target.address, "hello-4", ("failed", "running"))
        assert refused.state == "failed" and "a key this node's owner does not trust" in refused.reason

        # -- the node stays up: its replicas still run and it answers
        assert (await deployer.remote_query(target.address, "hello-1")).state == "running"
        assert await deployer.ping(target.address) >= 0

        # -- through the control socket: what `p2pdeploy replica start --by-blob` sends
        control = await ControlSocket.bind(service_root / "deployer")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, deployer)
                request = ReplicaRequest.start(target.address, "hello-5", bundle, by_blob=True)
                answer = await control_request(service_root / "deployer", request)
                assert isinstance(answer, ReplicaAnswer) and answer.reply.state == "fetching", answer
                fifth = await wait_for_state(deployer, target.address, "hello-5", ("running", "failed"))
                assert fifth.state == "running" and fetcher.counters["local"] == 2
                nursery.cancel_scope.cancel()
        finally:
            control.close()
