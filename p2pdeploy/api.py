"""The importable library API: run a node, use the overlay, talk to a running node.

In a trio program::

    from p2pdeploy import api

    async with api.open_node(("0.0.0.0", 7400), data_dir="state", bootstrap=[("seed.example", 7400)]) as node:
        await node.wait_joined()
        key = api.key_for("greeting")
        replicas = await node.put(key, b"hello", ttl_s=3600)
        value = await node.get(key)                  # bytes, or None when no node holds it
        closest = await node.lookup(key)             # [Contact(node_id, (host, port)), ...], closest first

Signed, mutable records: ``key, item = api.sign_record(identity, b"name", b"value", sequence)``,
then ``await node.put_item(key, item)`` and ``await node.get_item(key, latest=True)``.

To act on a node started by ``p2pdeploy join`` (another process) use its control socket::

    reply = await api.control_request("state", api.GetRequest(api.key_for("greeting")))

Overlay parameters are a :class:`KademliaConfig` (``open_node(..., kademlia=KademliaConfig(k=8))``).

Contributing a machine and running services on others (the remote protocol; every request is
signed with the node's key, every answer is a ``ReplicaStatusReply``, ``ReplicaLogsReply`` or a
``Refused`` naming the check that failed)::

    contribution = api.Contribution(cpu_cores=2, trusted_keys=frozenset({deployer_public_key}))
    async with api.open_node(data_dir="state", contribution=contribution) as node:
        ...                                          # hosts replicas until the block ends

    identity, _ = api.load_or_create_identity("deployer")   # its key file, created (mode 0600) on first use
    bundle = api.bundle_from_directory("examples/hello").sign(identity)
    async with api.open_node(identity=identity, layers=api.client_layers) as client:
        reply = await client.remote_start(("192.0.2.7", 7400), "hello-1", bundle)
        status = await client.remote_query(("192.0.2.7", 7400), "hello-1")
        logs = await client.remote_logs(("192.0.2.7", 7400), "hello-1")
        await client.remote_stop(("192.0.2.7", 7400), "hello-1")

Events (publish/subscribe on multicast groups, with content filters)::

    async with node.events("replicas", 'service == "wiki" and state in {"failed", "stopped"}') as (_, events):
        async for event in events:                   # Delivered(topic, publisher, sequence, attributes)
            ...
    node.publish("replicas", {"service": "wiki", "state": "failed"})

Through a running ``p2pdeploy join`` node instead:
``await api.control_request("state", api.ReplicaRequest.start(address, "hello-1", bundle))``.

Replicated persistence (content-addressed blobs, signed records, quorum records)::

    stored = await node.persistence.put_blob(data)           # BlobStored(blob_id, size, chunks, replicas, ...)
    data = await node.persistence.get_blob(stored.blob_id)   # bytes (every chunk checked), or None
    done = await node.persistence.quorum_put(identity, b"name", b"value")     # acknowledged by a majority
    read = await node.persistence.quorum_read(api.record_key(identity.public_key, b"name"))

Service deployment: a service ``NAME@KEY`` is deployed once, by its owner's key, and the
community keeps its replicas running (``DeployFinished``, ``StatusFinished``: see
``p2pdeploy.collective.deployment``)::

    done = await node.deploy(bundle, replicas=3)             # DeployFinished(ok, service, version, reason)
    status = await node.service_status("hello")              # NAME of this node's key, or NAME@OWNER
    report = status.report                                   # ServiceReport: manager, desired, replicas, decisions
    await node.scale("hello", replicas=5)
    names = await node.services()                            # this key's services (or services(owner_key))
    async with node.service_events("hello") as decisions:    # Delivered events of the service's topic
        ...
    await node.undeploy("hello")

Through a running ``p2pdeploy join`` node: ``api.DeployRequest.of(bundle, replicas=3)``,
``api.ScaleRequest("hello", 5)``, ``api.UndeployRequest("hello")``,
``api.ServiceStatusRequest("hello")`` and ``api.ServicesRequest()`` with ``api.control_request``.

A service hosted by a node reaches its state over HTTP on 127.0.0.1 (``P2PDEPLOY_STATE_URL`` and
``P2PDEPLOY_STATE_TOKEN`` in its environment; see ``p2pdeploy.runtime.state_api``). Through a
running node: ``api.BlobPutRequest(data)`` and ``api.BlobGetRequest(blob_id)``.
"""

from __future__ import annotations

from p2pdeploy.collective.deployment import DeployFinished, ServicesListed, StatusFinished
from p2pdeploy.collective.deployment_messages import (
    Decision,
    PlacedReplica,
    ServiceId,
    ServiceIdError,
    ServiceReport,
)
from p2pdeploy.collective.events import (
    NodeJoined,
    NodeLeft,
    ReplicaChanged,
    ServiceChanged,
    ServiceCreated,
    ServiceRemoved,
)
from p2pdeploy.collective.filters import Filter, FilterError
from p2pdeploy.collective.pubsub import Delivered
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.files import bundle_from_directory, load_contribution, load_or_create_identity
from p2pdeploy.node import client_layers, default_layers
from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, record_key, sign_record
from p2pdeploy.resource.bundle import Bundle, SignedBundle
from p2pdeploy.resource.protocol import LogsReply as ReplicaLogsReply
from p2pdeploy.resource.protocol import Refused
from p2pdeploy.resource.protocol import StatusReply as ReplicaStatusReply
from p2pdeploy.runtime.bundlefile import read_signed_bundle, write_signed_bundle
from p2pdeploy.runtime.control import (
    BlobGetReply,
    BlobGetRequest,
    BlobPutReply,
    BlobPutRequest,
    ControlError,
    ControlRequestRefused,
    DeployReply,
    DeployRequest,
    GetReply,
    GetRequest,
    LookupReply,
    LookupRequest,
    NoNodeRunning,
    NotOwner,
    PutReply,
    PutRequest,
    ReplicaAnswer,
    ReplicaRequest,
    ScaleRequest,
    ServicesReply,
    ServicesRequest,
    ServiceStatusReply,
    ServiceStatusRequest,
    StatusReply,
    StatusRequest,
    UndeployRequest,
    control_request,
    open_control,
    owned_service,
)
from p2pdeploy.runtime.executor import RealExecutorConfig
from p2pdeploy.runtime.node import (
    BundleNotStored,
    NodeNotRunning,
    NoDeployment,
    NoOverlay,
    NoRemoteClient,
    NotHosting,
    PingTimeout,
    RemoteTimeout,
    RuntimeConfig,
    RuntimeNode,
    open_node,
)
from p2pdeploy.runtime.state_api import NoPersistence


def key_for(name: str | bytes) -> int:
    """The overlay key of a name: the first 160 bits of SHA-256 of its (UTF-8) bytes.

    The same key the CLI uses for ``p2pdeploy put NAME``.
    """
    return key_id(name.encode() if isinstance(name, str) else bytes(name))


__all__ = [
    "Decision",
    "DeployFinished",
    "DeployReply",
    "DeployRequest",
    "NoDeployment",
    "NotOwner",
    "PlacedReplica",
    "ScaleRequest",
    "ServiceId",
    "ServiceIdError",
    "ServiceReport",
    "ServiceStatusReply",
    "ServiceStatusRequest",
    "ServicesListed",
    "ServicesReply",
    "ServicesRequest",
    "StatusFinished",
    "UndeployRequest",
    "owned_service",
    "BlobGetReply",
    "BlobGetRequest",
    "BlobPutReply",
    "BlobPutRequest",
    "Bundle",
    "Contact",
    "Contribution",
    "ControlError",
    "ControlRequestRefused",
    "Delivered",
    "Filter",
    "FilterError",
    "GetReply",
    "GetRequest",
    "Identity",
    "Item",
    "KademliaConfig",
    "LookupReply",
    "LookupRequest",
    "NoNodeRunning",
    "NoOverlay",
    "BundleNotStored",
    "NoPersistence",
    "NoRemoteClient",
    "NodeJoined",
    "NodeLeft",
    "NodeNotRunning",
    "NotHosting",
    "PingTimeout",
    "PutReply",
    "PutRequest",
    "RealExecutorConfig",
    "Refused",
    "RemoteTimeout",
    "ReplicaAnswer",
    "ReplicaChanged",
    "ReplicaLogsReply",
    "ReplicaRequest",
    "ReplicaStatusReply",
    "RuntimeConfig",
    "RuntimeNode",
    "ServiceChanged",
    "ServiceCreated",
    "ServiceRemoved",
    "SignedBundle",
    "StatusReply",
    "StatusRequest",
    "client_layers",
    "control_request",
    "bundle_from_directory",
    "default_layers",
    "key_for",
    "key_id",
    "load_contribution",
    "load_or_create_identity",
    "open_control",
    "open_node",
    "read_signed_bundle",
    "record_key",
    "sign_record",
    "write_signed_bundle",
]
