"""The protocol layers a real node runs: the one place a new layer joins the node's Stack.

The runtime hosts one :class:`p2pdeploy.core.Stack`. :func:`default_layers` lists its layers
bottom to top; a capability that adds a protocol (broadcast, the deployer) appends its object
here, built from the :class:`CoreContext` the runtime hands in. A test or an embedding
application passes its own ``layers`` factory to ``open_node``.

Today a ``p2pdeploy join`` node runs ping/pong (RTT estimates, ``p2pdeploy ping``) and the
Kademlia overlay (``p2pdeploy.overlay.kademlia``), configured by ``CoreContext.kademlia``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.ping import PingProtocol
from p2pdeploy.runtime.address import HostPort


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


LayersFactory = Callable[[CoreContext], list[Protocol]]


def default_layers(context: CoreContext) -> list[Protocol]:
    """The layers of a ``p2pdeploy join`` node, bottom to top."""
    return [
        PingProtocol(context.identity.node_id, context.rng, own_address=context.address),
        kademlia_layer(context),
    ]


def kademlia_layer(context: CoreContext) -> Kademlia:
    """The overlay with its own random stream split from the node's (its timers start with the node)."""
    return Kademlia(context.identity.node_id, random.Random(context.rng.getrandbits(64)), context.kademlia)


def build_core(context: CoreContext, layers: LayersFactory = default_layers) -> Stack:
    return Stack(layers(context))
