"""Whole ``p2pdeploy join`` nodes on the simulator, for the tests of service deployment.

Each node runs the stack :func:`p2pdeploy.node.default_layers` builds (the one a real node
runs), with a contribution, a durable store that survives its crashes (its disk), and the
simulated executor serving its replicas (:func:`p2pdeploy.sim.executor.serve_node`). Routing
tables start full, as :class:`tests.simnet.StorageNet`'s. Every node trusts every member's key.
"""

from __future__ import annotations

import random
from typing import Any

from p2pdeploy.collective.deployment import DeployFinished, Deployment, DeploymentConfig, StatusFinished
from p2pdeploy.collective.persistence import MemoryStore, PersistenceConfig
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.units import GIB
from p2pdeploy.node import CoreContext, default_layers
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.swim import DetectorConfig
from p2pdeploy.resource.bundle import Bundle, pack_files
from p2pdeploy.sim.executor import serve_node
from tests.simnet import SimNet, _NodeStack

OWNERS = ("ada", "bob", "cy", "dee", "eve")


def service_bundle(identity: Any, name: str = "web", *, placement: str = "replicas = 3", extra: str = "",
                   cpu: float = 0.5, version: str = "1.0") -> tuple[Any, bytes]:
    """A signed bundle of a small service and its manifest's text."""
    manifest = (f'name = "{name}"\nversion = "{version}"\ncommand = ["python3", "app.py"]\n{extra}'
                f'[resources]\ncpu = {cpu}\nmemory = "64M"\ndisk = "1M"\n'
                f'[placement]\n{placement}\n').encode()
    bundle = Bundle.parse(pack_files({"manifest.toml": manifest, "app.py": b"print(1)\n"})).sign(identity)
    return bundle, manifest


class DeployNet(SimNet):
    """``nodes`` full nodes; node ``i`` contributes ``cpu[i]`` cores (2 by default)."""

    def __init__(self, nodes: int, *, seed: int = 0, cpu: list[float] | None = None,
                 config: DeploymentConfig | None = None, detector: DetectorConfig | None = None,
                 max_services: int = 4, latency_s: float = 0.01) -> None:
        super().__init__(capacity=nodes, seed=seed, config=KademliaConfig(k=8, verify_contacts=False),
                         latency_s=latency_s)
        self.stores = [MemoryStore() for _ in range(nodes)]
        self.deployment_config = config or DeploymentConfig()
        self.detector_config = detector or DetectorConfig()
        members = frozenset(self.identity_of(a).public_key for a in range(nodes))
        draw = random.Random(seed)
        self.contributions = [
            Contribution(cpu_cores=(cpu[a] if cpu else 2.0), memory_bytes=4 * GIB, disk_bytes=16 * GIB,
                         max_services=max_services, owner=draw.choice(OWNERS), trusted_keys=members)
            for a in range(nodes)
        ]
        for address in range(nodes):
            self.node_ids[address] = self.identity_of(address).node_id
        for host in self.sim.hosts:
            serve_node(host, self.sim.streams.get("executor", host.address))
        for address in range(nodes):
            self._start(address)

    def _start(self, address: int, overlay_store: Any = None) -> None:
        host = self.sim.hosts[address]
        incarnation = host.incarnation + 1
        context = CoreContext(
            self.identity_of(address), address, self.sim.streams.fresh("node", address, incarnation), self.now,
            self.config, contribution=self.contributions[address], store=self.stores[address],
            detector=self.detector_config, persistence=PersistenceConfig(), deployment=self.deployment_config,
        )
        stack = _NodeStack(default_layers(context), self.sent, address)
        overlay = stack.layer(Kademlia)
        for other in range(len(self.stores)):
            if other != address:
                overlay.table.add(Contact(self.node_ids[other], other))
        self.nodes[address] = stack
        self.overlays[address] = overlay
        host.start(stack)
        host.call(lambda core, now: overlay.start(now))

    def restart(self, address: int, *, keep_overlay_store: bool = False) -> None:
        if not self.up(address):
            self._start(address)

    # -- the API -----------------------------------------------------------------------------
    def deployment(self, address: int) -> Deployment:
        return self.layer(address, Deployment)

    def deploy(self, address: int, bundle: Any, manifest: bytes, **options: Any) -> DeployFinished:
        op = self.call(address, lambda s, now: s.layer(Deployment).deploy(bundle, manifest, now, **options))
        return self.finished_op(address, op)

    def finished_op(self, address: int, op: int, timeout_s: float = 120.0) -> DeployFinished:
        """The end of node ``address``'s operation ``op``, run for until it comes. Only events
        emitted since the call count: a restarted node numbers its operations from the start again."""
        self.run_until(lambda: self._emitted_since(DeployFinished, address, op, "op_id") is not None, timeout_s)
        return self._emitted_since(DeployFinished, address, op, "op_id")

    def status(self, address: int, service: Any) -> StatusFinished:
        query = self.call(address, lambda s, now: s.layer(Deployment).status(service, now))
        self.run_until(lambda: self._emitted_since(StatusFinished, address, query, "query_id") is not None, 60.0)
        return self._emitted_since(StatusFinished, address, query, "query_id")

    def _emitted_since(self, cls: type, address: int, op: int, field: str) -> Any:
        start = self._marks.get((address, op), 0)
        return next((e for a, e in self.events[start:]
                     if a == address and isinstance(e, cls) and getattr(e, field) == op), None)

    def replicas_of(self, name: str, *, states: tuple[str, ...] = ("running",)) -> dict[str, int]:
        """Replica id -> address of every live node's replicas of ``name`` in ``states``."""
        found = {}
        for address in range(len(self.stores)):
            if not self.up(address):
                continue
            host = self.layer(address, ReplicaHost)
            for status in host.statuses():
                if status.replica_id.startswith(name + "-") and status.state.value in states:
                    found[status.replica_id] = address
        return found

    def managers_of(self, key: int) -> list[int]:
        return [a for a in range(len(self.stores)) if self.up(a) and key in self.deployment(a).managers]
