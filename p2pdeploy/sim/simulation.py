"""A simulated network of nodes: engine, seeded streams, network model, hosts and metrics.

:class:`Simulation` only assembles the parts; scenario files build one through
:mod:`p2pdeploy.sim.scenario`, tests and scripts build one directly::

    sim = Simulation(100, seed=7, network=NetworkConfig(latency_model="constant"))
    for host in sim.hosts:
        host.start(PingProtocol(host.address, sim.streams.fresh("node", host.address), ...))
    sim.run(until=60.0)
    sim.trace_hash  # equal for equal seeds

Messages travel as wire bytes unless ``NetworkConfig(encode=False)``; ``sim.network.partition``
and ``sim.network.heal`` split and join the network (see :mod:`p2pdeploy.sim.network`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p2pdeploy.sim.engine import Engine, Streams
from p2pdeploy.sim.host import Observer, SimNode
from p2pdeploy.sim.metrics import Metrics
from p2pdeploy.sim.network import Network, NetworkConfig


class Simulation:
    """``nodes`` hosts with addresses ``0 .. nodes-1`` on one engine and one network."""

    def __init__(
        self,
        nodes: int,
        *,
        seed: int = 0,
        network: NetworkConfig | None = None,
        trace: bool = True,
        observer: Observer | None = None,
        per_node_metrics: bool = True,
        size_of: Callable[[Any], int] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a simulation needs at least one node (got {nodes})")
        self.seed = seed
        self.engine = Engine(trace=trace)
        self.streams = Streams(seed)
        self.network = Network(self.engine, self.streams, nodes, network, size_of=size_of)
        self.hosts = [SimNode(address, self.engine, self.network, observer) for address in range(nodes)]
        self.network.attach(self.hosts)
        self.metrics = Metrics(nodes, per_node=per_node_metrics)

    @property
    def now(self) -> float:
        return self.engine.now

    @property
    def trace_hash(self) -> str:
        return self.engine.trace_hash

    def set_observer(self, observer: Observer) -> None:
        """Send every core event, ``observer(address, event)``, to ``observer``."""
        for host in self.hosts:
            host.observer = observer

    def nodes_up(self) -> int:
        return sum(1 for host in self.hosts if host.core is not None)

    def run(self, until: float | None = None) -> int:
        """Process events before ``until`` (see :meth:`Engine.run`); return how many ran."""
        return self.engine.run(until)
