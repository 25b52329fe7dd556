"""The protocol layers a real node runs: the one place a new layer joins the node's Stack.

The runtime hosts one :class:`p2pdeploy.core.Stack`. :func:`default_layers` lists its layers
bottom to top; a capability that adds a protocol (broadcast, the deployer) appends its object
here, built from the :class:`CoreContext` the runtime hands in. A test or an embedding
application passes its own ``layers`` factory to ``open_node``.

A ``p2pdeploy join`` node runs ping/pong (RTT estimates, ``p2pdeploy ping``), the Kademlia
overlay (``p2pdeploy.overlay.kademlia``, configured by ``CoreContext.kademlia``), broadcast,
multicast groups and publish/subscribe, replicated persistence (blobs, records and the state API's
quorum records, stored in ``CoreContext.data_dir``), the resource prospector, the replicas it
hosts (:class:`~p2pdeploy.fabric.replicas.ReplicaHost`, within ``CoreContext.contribution``)
with the node side of the remote protocol around them
(:class:`~p2pdeploy.resource.protocol.RemoteControl`), and the deployer side of that protocol
(:class:`~p2pdeploy.resource.protocol.RemoteClient`), so the node can also send signed requests.
A node built without a contribution hosts nothing: ephemeral nodes (``p2pdeploy ping``,
``p2pdeploy replica ...`` without a running node) and library users who only use the overlay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2pdeploy.collective.persistence import PersistenceConfig
from p2pdeploy.collective.prospector import Prospector, ProspectorConfig
from p2pdeploy.collective.pubsub import PubSub
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.overlay.broadcast import Broadcast
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.multicast import Multicast
from p2pdeploy.overlay.ping import PingProtocol
from p2pdeploy.resource.description import node_attributes
from p2pdeploy.resource.protocol import RemoteClient, RemoteConfig, RemoteControl
from p2pdeploy.runtime.address import HostPort
from p2pdeploy.runtime.overlay_store import open_overlay_store
from p2pdeploy.runtime.state_api import persistence_layer


@dataclass(frozen=True, slots=True)
class CoreContext:
    """What a layer may be built from: never a socket, a clock or global randomness."""

    identity: Identity
    #: The node's advertised address (``(host, port)``, the same for UDP and TCP).
    address: HostPort
    #: Seeded by the runtime; layers share it (split it with ``random.Random(rng.getrandbits(64))``).
    rng: random.Random
    #: The time the node starts, in the core's clock (``trio.current_time()`` seconds).
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
    #: The node's data directory: the persistence layer keeps its SQLite store and chunk files
    #: there (``None``: in memory, lost when the node stops).
    data_dir: Path | None = None
    #: Parameters of replicated persistence (``RuntimeConfig.persistence``).
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)


LayersFactory = Callable[[CoreContext], list[Protocol]]


def default_layers(context: CoreContext) -> list[Protocol]:
    """The layers of a ``p2pdeploy join`` node, bottom to top."""
    ping = PingProtocol(context.identity.node_id, context.rng, own_address=context.address)
    overlay = kademlia_layer(context)
    groups = group_layers(context, overlay)
    replicas = replica_layers(context)
    host = next((layer for layer in replicas if isinstance(layer, ReplicaHost)), None)
    prospector = prospector_layer(context, overlay, host)
    client = remote_client_layer(context)
    # Built last: it opens the store in the data directory, which nothing failing after it may leak.
    persistence = persistence_layer(context, [overlay], config=context.persistence)
    return [ping, overlay, *groups, persistence, *replicas, prospector, client]


def prospector_layer(context: CoreContext, overlay: Kademlia, host: ReplicaHost | None = None) -> Prospector:
    """This node's description in the resource tree, refreshed before every update."""

    def describe() -> dict[str, object]:
        if context.contribution is None:
            return dict(context.machine.attributes()) if context.machine is not None else {}
        free = host.admission.free() if host is not None else None
        return node_attributes(context.contribution, free, context.machine)

    prospector = Prospector(overlay, context.address, random.Random(context.rng.getrandbits(64)),
                            context.prospector, describe=describe)
    prospector.start(context.now)
    return prospector


def client_layers(context: CoreContext) -> list[Protocol]:
    """An ephemeral deployer: ping (to learn a node's id) and the sending side of the remote protocol."""
    return [
        PingProtocol(context.identity.node_id, context.rng, own_address=context.address),
        remote_client_layer(context),
    ]


def kademlia_layer(context: CoreContext) -> Kademlia:
    """The overlay with its own random stream split from the node's (its timers start with the node),
    holding its values in ``overlay.sqlite3`` in the data directory (memory without one)."""
    return Kademlia(context.identity.node_id, random.Random(context.rng.getrandbits(64)), context.kademlia,
                    store=open_overlay_store(context))


def group_layers(context: CoreContext, overlay: Kademlia) -> list[Protocol]:
    """Broadcast, multicast groups and publish/subscribe on top of the overlay."""
    multicast = Multicast(overlay, random.Random(context.rng.getrandbits(64)), context.address)
    return [
        Broadcast(overlay, random.Random(context.rng.getrandbits(64))),
        multicast,
        PubSub(multicast, random.Random(context.rng.getrandbits(64))),
    ]


def replica_layers(context: CoreContext) -> list[Protocol]:
    """The replicas this node hosts and the remote protocol's node side; none without a contribution.

    The node's own key is an owner key: it may start, stop and read any replica here.
    """
    if context.contribution is None:
        return []
    host = ReplicaHost(context.contribution, random.Random(context.rng.getrandbits(64)))
    remote = RemoteControl(
        context.identity.node_id,
        host,
        machine=context.machine,
        owner_keys=frozenset({context.identity.public_key}),
        config=context.remote,
        wall_clock_offset_s=context.wall_clock_offset_s,
    )
    return [host, remote]


def remote_client_layer(context: CoreContext) -> RemoteClient:
    """The deployer side of the remote protocol, signing with the node's key.

    Its nonces must not repeat within a node's replay window, so its stream gets 128 bits of seed.
    """
    return RemoteClient(
        context.identity,
        random.Random(context.rng.getrandbits(128)),
        timeout_s=context.remote_timeout_s,
        wall_clock_offset_s=context.wall_clock_offset_s,
    )


def build_core(context: CoreContext, layers: LayersFactory = default_layers) -> Stack:
    return Stack(layers(context))
