"""Bundles by content id: a start names a blob, the node fetches, verifies and caches the bundle.

Each node is a :class:`~p2pdeploy.core.Stack` of real layers, in the order
``p2pdeploy.node.default_layers`` gives them (Kademlia, persistence, the replica host, the
remote protocol's node side, the :class:`BundleFetcher`, the remote protocol's client side), on
the simulator (``tests/simnet.py``; every message crosses the wire codec).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.bundles import BundleFetcher, BundleToCheck
from p2pdeploy.collective.persistence import (
    BlobStored,
    FetchChunk,
    FindHolders,
    MemoryStore,
    Persistence,
    PersistenceConfig,
)
from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import InstallBundle, ProcessSpec
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import FetchBundle, ReplicaSpec, ReplicaState
from p2pdeploy.fabric.units import GIB
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.bundle import Bundle, pack_files
from p2pdeploy.resource.protocol import (
    Refused,
    RemoteClient,
    RemoteConfig,
    RemoteControl,
    RequestAnswered,
    StartReplica,
    StatusReply,
    sign_request,
    verify_request,
)
from tests.simnet import SimNet

DEPLOYER = Identity.from_seed(b"d" * 32)
STRANGER = Identity.from_seed(b"s" * 32)
CONFIG = PersistenceConfig(chunk_bytes=4096, repair_interval_s=3600.0, scrub_interval_s=3600.0)
NODES = 8


def signed_bundle(signer: Identity = DEPLOYER, cpu: int = 1, payload: int = 12_000):
    manifest = (f'name = "web"\nversion = "1.0"\ncommand = ["python3", "app.py"]\n'
                f'[resources]\ncpu = {cpu}\nmemory = "64M"\n').encode()
    filler = random.Random(7).randbytes(payload)  # several chunks, so the fetch is a real one
    return Bundle.parse(pack_files({"manifest.toml": manifest, "app.py": b"print(1)\n", "data.bin": filler})).sign(signer)


def layers(overlay, rng, remote_config=None):
    contribution = Contribution(cpu_cores=2, memory_bytes=4 * GIB, max_services=8,
                                trusted_keys=frozenset({DEPLOYER.public_key}))
    persistence = Persistence(overlay, MemoryStore(), random.Random(rng.getrandbits(64)), 0.0,
                              own_address=None, config=CONFIG)
    host = ReplicaHost(contribution, random.Random(rng.getrandbits(64)))
    remote = RemoteControl(overlay.node_id, host, config=remote_config)
    fetcher = BundleFetcher(persistence, remote)
    client = RemoteClient(DEPLOYER, random.Random(rng.getrandbits(128)))
    return [persistence, host, remote, fetcher, client]


class Net(SimNet):
    def __init__(self, seed: int = 1, remote_config: RemoteConfig | None = None) -> None:
        super().__init__(lambda overlay, rng: layers(overlay, rng, remote_config), seed=seed)
        self.fill_tables(NODES)
        for index, stack in self.nodes.items():
            persistence = stack.layer(Persistence)
            persistence.contact = dataclasses.replace(persistence.contact, address=index)

    def store_blob(self, index: int, data: bytes) -> int:
        query = self.call(index, lambda s, now: s.layer(Persistence).put_blob(data, now))
        self.run_until(lambda: any(e.query_id == query for e in self.events_of(BlobStored, index)))
        stored = next(e for e in self.events_of(BlobStored, index) if e.query_id == query)
        assert stored.ok, stored.reason
        return stored.blob_id

    def start(self, src: int, dst: int, replica_id: str, bundle, blob_id: int | None):
        node_id = self.overlays[dst].node_id
        return self.call(src, lambda s, now: s.layer(RemoteClient).start(dst, node_id, replica_id, bundle, now,
                                                                         blob_id=blob_id))

    def answer(self, index: int, request_id: int):
        self.run_until(lambda: any(e.request_id == request_id for e in self.events_of(RequestAnswered, index)))
        return next(e.reply for e in self.events_of(RequestAnswered, index) if e.request_id == request_id)

    def state(self, index: int, replica_id: str):
        status = self.layer(index, ReplicaHost).status(replica_id)
        return None if status is None else status.state

    def installs(self, index: int) -> list[InstallBundle]:
        return self.events_of(InstallBundle, index)

    def network_fetches_from(self, index: int, since: int) -> int:
        return sum(1 for src, _, msg in self.sent[since:] if src == index and isinstance(msg, FindHolders | FetchChunk))

    def holders(self, key: int) -> list[int]:
        return [i for i in self.nodes if self.layer(i, Persistence).store.chunk_info(key) is not None]


def keys_of(data: bytes) -> list[int]:
    chunked = split(data, CONFIG.chunk_bytes, CONFIG.replicas)
    return [chunked.blob_id, *dict(chunked.chunks)]


def test_a_start_by_blob_id_fetches_the_bundle_verifies_it_and_installs_it():
    net = Net()
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    target = next(i for i in range(1, NODES) if i not in net.holders(blob_id))
    reply = net.answer(0, net.start(0, target, "web-1", bundle, blob_id))
    assert isinstance(reply, StatusReply) and reply.state == "fetching"
    net.run_until(lambda: net.installs(target))
    assert [i.bundle for i in net.installs(target)] == [bundle.data]
    assert net.state(target, "web-1") is ReplicaState.INSTALLING
    assert net.layer(target, BundleFetcher).counters["fetched"] == 1
    # cached: every chunk of the bundle is pinned in the node's store
    store = net.layer(target, Persistence).store
    assert all(store.chunk_info(key) is not None and store.chunk_info(key).pinned for key in keys_of(bundle.data))
    # the replica took the manifest's spec and reserved its demand once the bundle arrived
    supervisor = net.layer(target, ReplicaHost).supervisor("web-1")
    assert supervisor.spec.process.argv == ("python3", "app.py")
    assert "web-1" in net.layer(target, ReplicaHost).admission.holders()


def test_where_the_driver_parses_bundles_a_fetched_one_waits_for_its_check_then_installs():
    net = Net(seed=4, remote_config=RemoteConfig(parse_bundles_ahead=True))
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    net.answer(0, net.start(0, 3, "web-1", bundle, blob_id))
    net.run_until(lambda: net.events_of(BundleToCheck, 3))
    (to_check,) = net.events_of(BundleToCheck, 3)
    assert (to_check.blob_id, to_check.data) == (blob_id, bundle.data)
    assert net.installs(3) == [] and net.state(3, "web-1") is ReplicaState.FETCHING  # until the driver answers
    net.call(3, lambda s, now: s.layer(BundleFetcher).bundle_checked(blob_id, Bundle.parse(bundle.data), now))
    assert [i.bundle for i in net.installs(3)] == [bundle.data]


def test_a_second_replica_of_a_bundle_held_on_the_node_fetches_nothing():
    net = Net(seed=2)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    net.answer(0, net.start(0, 5, "web-1", bundle, blob_id))
    net.run_until(lambda: len(net.installs(5)) == 1)
    mark = len(net.sent)
    reply = net.answer(0, net.start(0, 5, "web-2", bundle, blob_id))
    assert isinstance(reply, StatusReply)
    net.run_until(lambda: len(net.installs(5)) == 2)
    assert net.installs(5)[1].replica_id == "web-2" and net.installs(5)[1].bundle == bundle.data
    assert net.network_fetches_from(5, mark) == 0
    assert net.layer(5, BundleFetcher).counters["local"] == 1


def test_concurrent_starts_of_one_bundle_share_one_fetch():
    net = Net(seed=3)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    target = next(i for i in range(1, NODES) if i not in net.holders(blob_id))
    first = net.start(0, target, "web-1", bundle, blob_id)
    second = net.start(0, target, "web-2", bundle, blob_id)
    assert net.answer(0, first).state == "fetching" and net.answer(0, second).state == "fetching"
    net.run_until(lambda: len(net.installs(target)) == 2)
    counters = net.layer(target, BundleFetcher).counters
    assert counters["fetched"] == 1 and counters["shared"] == 1
    assert {i.replica_id for i in net.installs(target)} == {"web-1", "web-2"}


def test_a_bundle_signed_by_an_untrusted_key_fails_the_replica_and_is_not_kept():
    net = Net(seed=4)
    bundle = signed_bundle(signer=STRANGER)  # the request is signed by the trusted deployer
    blob_id = net.store_blob(0, bundle.data)
    target = next(i for i in range(1, NODES) if i not in net.holders(blob_id))
    assert net.answer(0, net.start(0, target, "web-1", bundle, blob_id)).state == "fetching"
    net.run_until(lambda: net.state(target, "web-1") is ReplicaState.FAILED)
    status = net.layer(target, ReplicaHost).status("web-1")
    assert status.reason.startswith("bundle: signed by ") and status.reason.endswith("does not trust")
    assert not net.installs(target)
    assert net.layer(target, RemoteControl).refused["bundle"] == 1
    store = net.layer(target, Persistence).store
    assert not any(info.pinned for info in store.chunk_infos())
    assert "web-1" not in net.layer(target, ReplicaHost).admission.holders()


def test_a_chunk_corrupted_on_every_holder_fails_the_replica():
    net = Net(seed=5)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    chunk = keys_of(bundle.data)[2]
    for index in net.holders(chunk):
        net.layer(index, Persistence).store.corrupt(chunk)
    target = next(i for i in range(1, NODES) if i not in net.holders(chunk) and i not in net.holders(blob_id))
    net.answer(0, net.start(0, target, "web-1", bundle, blob_id))
    net.run_until(lambda: net.state(target, "web-1") is ReplicaState.FAILED)
    reason = net.layer(target, ReplicaHost).status("web-1").reason
    assert reason.startswith(f"bundle fetch failed: chunk {chunk:040x} not found (") and "no intact copy" in reason
    assert not net.installs(target)
    assert net.layer(target, BundleFetcher).counters["failed"] == 1


def test_a_blob_nobody_stored_fails_the_replica_and_the_id_can_start_again():
    net = Net(seed=6)
    bundle = signed_bundle()
    missing = split(b"never stored", CONFIG.chunk_bytes, CONFIG.replicas).blob_id
    net.answer(0, net.start(0, 3, "web-1", bundle, missing))
    net.run_until(lambda: net.state(3, "web-1") is ReplicaState.FAILED)
    assert net.layer(3, ReplicaHost).status("web-1").reason == "bundle fetch failed: manifest not found"
    blob_id = net.store_blob(0, bundle.data)
    assert net.answer(0, net.start(0, 3, "web-1", bundle, blob_id)).state == "fetching"
    net.run_until(lambda: net.installs(3))


def test_a_replica_stopped_while_fetching_installs_nothing():
    net = Net(seed=7)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    target = next(i for i in range(1, NODES) if i not in net.holders(blob_id))
    net.answer(0, net.start(0, target, "web-1", bundle, blob_id))
    net.call(target, lambda s, now: s.layer(ReplicaHost).stop_replica("web-1", now))
    fetcher = net.layer(target, BundleFetcher)
    net.run_until(lambda: not fetcher.fetching())
    net.run()
    assert net.state(target, "web-1") is ReplicaState.STOPPED
    assert not net.installs(target) and not net.layer(target, ReplicaHost).admission.holders()


def test_admission_is_checked_when_the_bundle_arrives():
    net = Net(seed=8)
    bundle = signed_bundle(cpu=4)  # the node contributes 2 cores
    blob_id = net.store_blob(0, bundle.data)
    net.answer(0, net.start(0, 4, "web-1", bundle, blob_id))
    net.run_until(lambda: net.state(4, "web-1") is ReplicaState.FAILED)
    assert net.layer(4, ReplicaHost).status("web-1").reason.startswith("admission: ")
    assert not net.installs(4)


def test_a_fetch_of_a_replica_not_started_by_blob_id_goes_on_to_the_driver():
    net = Net(seed=9)
    spec = ReplicaSpec(ProcessSpec("local-1", 1, ("true",)))
    net.call(2, lambda s, now: s.layer(ReplicaHost).start_replica(spec, Demand(), now, digest=b"\x01" * 32))
    assert [e.replica_id for e in net.events_of(FetchBundle, 2)] == ["local-1"]
    assert net.layer(2, BundleFetcher).counters.total() == 0


def test_the_request_signature_covers_the_blob_id():
    bundle = signed_bundle()
    request = StartReplica(1, 5, DEPLOYER.public_key, b"n" * 16, 0.0, "web-1", b"", bundle.public_key,
                           bundle.signature, {}, bundle_blob=b"\x07" * 20)
    signed = sign_request(request, DEPLOYER)
    assert verify_request(signed) and signed.blob_id == int.from_bytes(b"\x07" * 20, "big")
    assert not verify_request(dataclasses.replace(signed, bundle_blob=b"\x08" * 20))


def test_a_start_carries_its_bundle_or_names_its_blob_not_both():
    bundle = signed_bundle()
    with pytest.raises(ValueError, match="not both"):
        StartReplica(1, 5, DEPLOYER.public_key, b"n" * 16, 0.0, "web-1", bundle.data, bundle.public_key,
                     bundle.signature, {}, bundle_blob=b"\x07" * 20)
    with pytest.raises(ValueError, match="20-byte"):
        StartReplica(1, 5, DEPLOYER.public_key, b"n" * 16, 0.0, "web-1", b"", bundle.public_key,
                     bundle.signature, {}, bundle_blob=b"\x07" * 19)


def test_a_stranger_cannot_start_by_blob_id():
    net = Net(seed=10)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    client = net.layer(1, RemoteClient)
    client.identity = STRANGER
    reply = net.answer(1, net.start(1, 3, "web-1", bundle, blob_id))
    assert isinstance(reply, Refused) and reply.check == "trust"
    assert net.state(3, "web-1") is None


def test_a_chunk_every_holder_serves_tampered_fails_the_replica_with_a_hash_mismatch():
    net = Net(seed=11)
    bundle = signed_bundle()
    blob_id = net.store_blob(0, bundle.data)
    chunk = keys_of(bundle.data)[1]
    for index in net.holders(chunk):
        store = net.layer(index, Persistence).store
        honest = store.read_chunk
        store.read_chunk = lambda key, honest=honest: b"tampered" if key == chunk else honest(key)  # a lying holder
    target = next(i for i in range(1, NODES) if i not in net.holders(chunk) and i not in net.holders(blob_id))
    net.answer(0, net.start(0, target, "web-1", bundle, blob_id))
    net.run_until(lambda: net.state(target, "web-1") is ReplicaState.FAILED)
    reason = net.layer(target, ReplicaHost).status("web-1").reason
    assert reason.startswith(f"bundle fetch failed: chunk {chunk:040x} not found: hash mismatch (")
    assert not net.installs(target)
