"""A node's whole protocol stack, composed once for both drivers.

:func:`default_layers` builds the layers of a ``p2pdeploy join`` node, bottom to top, from a
:class:`CoreContext`: its identity, address, seeded random stream, configuration, contribution,
machine and durable store. The trio runtime (:mod:`p2pdeploy.runtime.node`) and the simulator
(the ``node`` runner in :mod:`p2pdeploy.sim.runners.node`) both call it, so a simulated node
runs the same layers, wired the same way, as a real one. A test or an embedding application
passes its own ``layers`` factory to ``open_node`` (:func:`client_layers` for an ephemeral
deployer).

A full node runs ping/pong (RTT estimates, ``p2pdeploy ping``), the failure detector
(:class:`~p2pdeploy.overlay.swim.FailureDetector`, watching the overlay's contacts), the Kademlia
overlay (configured by ``CoreContext.kademlia``), broadcast, multicast groups and publish/subscribe,
replicated persistence (blobs, records and the state API's quorum records, in
``CoreContext.store``), the replicas it hosts (:class:`~p2pdeploy.fabric.replicas.ReplicaHost`,
within ``CoreContext.contribution``) with the node side of the remote protocol around them
(:class:`~p2pdeploy.resource.protocol.RemoteControl`) and the fetcher of the bundles that starts
name by blob id (:class:`~p2pdeploy.collective.bundles.BundleFetcher`), its description
(:class:`~p2pdeploy.resource.description.NodeDescription`, what the prospector publishes), the
resource prospector, the deployer side of the remote protocol
(:class:`~p2pdeploy.resource.protocol.RemoteClient`), so the node can also send signed requests,
and service deployment on top (:class:`~p2pdeploy.collective.deployment.Deployment`: the managers
of the services whose records it holds, the reports of the replicas it hosts, the owner's
deploy, scale and undeploy).
A node built without a contribution hosts nothing: ephemeral nodes (``p2pdeploy ping``,
``p2pdeploy replica ...`` without a running node) and library users who only use the overlay.

Layers talk through the :class:`~p2pdeploy.core.Stack`: a layer holds the layers below it and
calls them; the events of lower layers flow up to the layers that consume them. Nothing here
reads a file, a clock or global randomness: the driver opens the store and hands in the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.collective.bundles import BundleFetcher
from p2pdeploy.collective.deployment import Deployment, DeploymentConfig
from p2pdeploy.collective.persistence import DurableStore, MemoryStore, Persistence, PersistenceConfig
from p2pdeploy.collective.prospector import Prospector, ProspectorConfig
from p2pdeploy.collective.pubsub import PubSub
from p2pdeploy.core import Protocol, Rng, Stack
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.overlay.broadcast import Broadcast
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.multicast import Multicast
from p2pdeploy.overlay.ping import PingProtocol
from p2pdeploy.overlay.storage import OverlayStore
from p2pdeploy.overlay.swim import DetectorConfig, FailureDetector
from p2pdeploy.resource.description import NodeDescription
from p2pdeploy.resource.protocol import RemoteClient, RemoteConfig, RemoteControl
from p2pdeploy.wire import Address


@dataclass(frozen=True, slots=True)
class CoreContext:
    """What a layer may be built from: never a socket, a clock or global randomness."""

    identity: Identity
    #: The node's advertised address (``(host, port)`` on a real network, the same for UDP and
    #: TCP; a node index in the simulator).
    address: Address
    #: Seeded by the driver; each layer gets its own stream split from it (:func:`split`).
    rng: Rng
    #: The time the node starts, in the core's clock (``trio.current_time()`` seconds, or virtual time).
    now: float
    #: Parameters of the Kademlia overlay (``RuntimeConfig.kademlia``).
    kademlia: KademliaConfig = field(default_factory=KademliaConfig)
    #: What the owner contributes (already clamped to the machine); ``None``: the node hosts no replicas.
    contribution: Contribution | None = None
    #: What the runtime probed of this machine (for requirements such as ``cores >= 2``).
    machine: Machine | None = None
    #: Parameters of the node side of the remote protocol (``RuntimeConfig.remote``).
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    #: How long the deployer side waits for a node's answer (``RuntimeConfig.remote_timeout_s``).
    remote_timeout_s: float = 10.0
    #: Wall-clock time minus the core's clock: signed timestamps are wall time.
    wall_clock_offset_s: float = 0.0
    #: Parameters of the resource prospector (``RuntimeConfig.prospector``).
    prospector: ProspectorConfig = field(default_factory=ProspectorConfig)
    #: The node's durable store, opened by the driver (SQLite and chunk files in the data
    #: directory on a real node; kept across a crash by the simulator). ``None``: a store in
    #: memory, lost when the node stops.
    store: DurableStore | None = None
    #: The overlay's store of values and of what this node published, opened by the driver
    #: (``overlay.sqlite3`` in the data directory on a real node). ``None``: in memory.
    overlay_store: OverlayStore | None = None
    #: Parameters of the failure detector (``RuntimeConfig.detector``); ``None``: no detector.
    detector: DetectorConfig | None = field(default_factory=DetectorConfig)
    #: Parameters of replicated persistence (``RuntimeConfig.persistence``).
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    #: Parameters of service deployment (managers, reports between hosts and managers).
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)


LayersFactory = Callable[[CoreContext], list[Protocol]]


def split(rng: Rng, bits: int = 64) -> Any:
    """A new stream of ``rng``'s class (``random.Random``) seeded from ``bits`` of it: each layer
    draws on its own."""
    return type(rng)(rng.getrandbits(bits))  # type: ignore[call-arg]


def default_layers(context: CoreContext) -> list[Protocol]:
    """The layers of a ``p2pdeploy join`` node, bottom to top."""
    ping = PingProtocol(context.identity.node_id, context.rng, own_address=context.address)
    detector = detector_layers(context)
    overlay = kademlia_layer(context, *detector)
    groups = group_layers(context, overlay)
    replicas = replica_layers(context)
    host = next((layer for layer in replicas if isinstance(layer, ReplicaHost)), None)
    description = NodeDescription(context.contribution, host, context.machine)
    prospector = prospector_layer(context, overlay)
    client = remote_client_layer(context)
    persistence = persistence_layer(context, overlay)
    remote = next((layer for layer in replicas if isinstance(layer, RemoteControl)), None)
    bundles = [] if remote is None else [BundleFetcher(persistence, remote)]
    pubsub = next(layer for layer in groups if isinstance(layer, PubSub))
    deployment = Deployment(
        context.identity, context.address, overlay, persistence, prospector, client, split(context.rng), context.now,
        pubsub=pubsub, detector=detector[0] if detector else None, remote=remote, host=host,
        config=context.deployment,
    )
    return [ping, *detector, overlay, *groups, persistence, *replicas, *bundles, description, prospector, client,
            deployment]


def detector_layers(context: CoreContext) -> list[FailureDetector]:
    """The node's failure detector (SWIM with Lifeguard), watching what the overlay's routing
    table holds; none when ``context.detector`` is None."""
    if context.detector is None:
        return []
    return [FailureDetector(context.identity.node_id, split(context.rng), context.detector)]


def prospector_layer(context: CoreContext, overlay: Kademlia) -> Prospector:
    """This node's part of the resource tree; it publishes what the ``NodeDescription`` below it says."""
    prospector = Prospector(overlay, context.address, split(context.rng), context.prospector)
    prospector.start(context.now)
    return prospector


def persistence_layer(context: CoreContext, overlay: Kademlia) -> Persistence:
    """Replicated persistence over ``overlay``, in ``context.store`` (memory when there is none).
    It signs the pins of the blobs it puts with the node's key, and keeps data beyond the quotas
    for strangers only when signed by a key the owner trusts (``contribution.trusted_keys``) or
    by its own."""
    return Persistence(
        overlay,
        context.store if context.store is not None else MemoryStore(),
        split(context.rng),
        context.now,
        own_address=context.address,
        config=context.persistence,
        identity=context.identity,
        trusted_keys=context.contribution.trusted_keys if context.contribution is not None else frozenset(),
        wall_clock_offset_s=context.wall_clock_offset_s,
    )


def client_layers(context: CoreContext) -> list[Protocol]:
    """An ephemeral deployer: ping (to learn a node's id) and the sending side of the remote protocol."""
    return [
        PingProtocol(context.identity.node_id, context.rng, own_address=context.address),
        remote_client_layer(context),
    ]


def kademlia_layer(context: CoreContext, detector: FailureDetector | None = None) -> Kademlia:
    """The overlay with its own random stream split from the node's (its timers start with the node),
    holding its values in ``context.overlay_store`` (memory when there is none); with a
    ``detector`` below it, dead contacts cost its lookups nothing."""
    return Kademlia(context.identity.node_id, split(context.rng), context.kademlia, store=context.overlay_store,
                    detector=detector, identity=context.identity)


def group_layers(context: CoreContext, overlay: Kademlia) -> list[Protocol]:
    """Broadcast, multicast groups and publish/subscribe on top of the overlay."""
    multicast = Multicast(overlay, split(context.rng), context.address)
    return [
        Broadcast(overlay, split(context.rng)),
        multicast,
        PubSub(multicast, split(context.rng)),
    ]


def replica_layers(context: CoreContext) -> list[Protocol]:
    """The replicas this node hosts and the remote protocol's node side; none without a contribution.

    The node's own key is an owner key: it may start, stop and read any replica here.
    """
    if context.contribution is None:
        return []
    host = ReplicaHost(context.contribution, split(context.rng))
    remote = RemoteControl(
        context.identity.node_id,
        host,
        machine=context.machine,
        owner_keys=frozenset({context.identity.public_key}),
        config=context.remote,
        wall_clock_offset_s=context.wall_clock_offset_s,
        started_s=context.now,
    )
    return [host, remote]


def remote_client_layer(context: CoreContext) -> RemoteClient:
    """The deployer side of the remote protocol, signing with the node's key.

    Its nonces must not repeat within a node's replay window, so its stream gets 128 bits of seed.
    """
    return RemoteClient(
        context.identity,
        split(context.rng, 128),
        timeout_s=context.remote_timeout_s,
        wall_clock_offset_s=context.wall_clock_offset_s,
    )


def build_core(context: CoreContext, layers: LayersFactory = default_layers) -> Stack:
    return Stack(layers(context))
