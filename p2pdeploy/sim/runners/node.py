"""The ``node`` runner: full nodes, every layer of a ``p2pdeploy join`` node, under churn.

Each simulated node hosts the stack :func:`p2pdeploy.node.default_layers` builds, the very
composition a real node runs: ping, the Kademlia overlay, broadcast, multicast, pub/sub,
replicated persistence, the replicas it hosts with the remote protocol around them (served by
the simulated executor, :func:`p2pdeploy.sim.executor.serve_node`), its description, the
resource prospector and the remote client, with the failure detector under the overlay
(``[detector]``: on, with a 5 s protocol period, ten times a real node's loopback default, as
suits a WAN-sized network). Nothing is left out to save time, so the layers'
interactions (events flowing up the stack, shared routing tables) run here as on trio.

The workload is the persistence runner's (blobs stored, churn, every blob fetched at the end)
and the overlay runner's (values put, lookups and gets) plus ``node.prospects`` prospects
from random live nodes over the workload window. Every node contributes resources drawn from
a few machine sizes and owners, so prospects have something to find, and trusts the key that
signs the blobs (the persistence runner's deployer). A node's store survives
its crashes (its disk); a permanent departure loses it, as in the persistence runner.

Each node measures its availability as a real node does (:mod:`p2pdeploy.fabric.uptime`): the
runner keeps its uptime history on its "disk" (virtual time as wall time), begins a session at
every (re)start, records a heartbeat every ``node.uptime_heartbeat_s`` while the node is up (a
crash loses what came after the last one) and hands the availability to the node's
description, which the prospector publishes. A permanent departure loses the history with the disk.

Summary keys beside the persistence runner's: ``prospect_success`` (the share of prospects
that found ``n`` nodes when at least ``n`` live nodes matched, or all of them otherwise),
``messages_per_node_per_s`` (a mapping: layer -> messages sent per node per second, over the
whole run) and ``events_per_second`` (from the scenario machinery).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.deployment import DeploymentConfig
from p2pdeploy.collective.prospector import ProspectFinished, Prospector, ProspectorConfig
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.uptime import UptimeHistory
from p2pdeploy.node import CoreContext, default_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.resource.description import NodeDescription
from p2pdeploy.resource.requirements import Requirement
from p2pdeploy.sim.executor import serve_node
from p2pdeploy.sim.runner import register_runner
from p2pdeploy.sim.runners.overlay import detector_schema
from p2pdeploy.sim.runners.persistence import PersistenceRunner
from p2pdeploy.sim.schema import Field

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation

GIB = 1 << 30
#: The machines volunteers contribute: (cpu cores, memory bytes), drawn per node.
MACHINE_SIZES = ((1.0, 1 * GIB), (2.0, 4 * GIB), (4.0, 8 * GIB), (8.0, 16 * GIB))
OWNERS = ("ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal")


@register_runner
class NodeRunner(PersistenceRunner):
    name = "node"
    schema = {
        **PersistenceRunner.schema,
        "overlay": {
            **PersistenceRunner.schema["overlay"],
            "verify_contacts": Field(True, bool, "a contact joins a routing table only after it signed a challenge at "
                                     "its address with its key, as on a real node"),
        },
        "node": {
            "prospects": Field(200, int, "prospects asked from random live nodes over the workload window", ge=0),
            "prospect_n": Field(3, int, "nodes each prospect asks for", ge=1),
            "prospect_requirement": Field("cpu_free >= 2 and memory_free >= 4G", str,
                                          "what each prospect asks for (the manifest language)"),
            "prospector_update_interval_s": Field(ProspectorConfig().update_interval_s, float,
                                                  "how often a node reports to its parent in the tree", gt=0),
            "uptime_heartbeat_s": Field(60.0, float, "how often a node records in its uptime history that it is "
                                        "up and advertises its availability again (a real node's default)", gt=0),
        },
        "detector": detector_schema(enabled=True),
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        if scenario.values["overlay"]["identities"] != "ed25519":
            raise scenario.error("overlay.identities", "a full node signs with its key pair: use \"ed25519\"")
        try:
            Requirement.parse(scenario.values["node"]["prospect_requirement"])
        except ValueError as exc:
            raise scenario.error("node.prospect_requirement", str(exc)) from None

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        n = scenario.section("node")
        self.n = n
        self.requirement = Requirement.parse(n["prospect_requirement"])
        self.prospector_config = ProspectorConfig(update_interval_s=n["prospector_update_interval_s"])
        nodes = len(sim.hosts)
        draw = sim.streams.get("node-contributions")
        self.contributions = [
            Contribution(cpu_cores=cpu, memory_bytes=memory, disk_bytes=64 * GIB, max_services=4,
                         owner=draw.choice(OWNERS), trusted_keys=frozenset({self.deployer.public_key}))
            for cpu, memory in (draw.choice(MACHINE_SIZES) for _ in range(nodes))
        ]
        self.stacks: list[Stack | None] = [None] * nodes
        #: The deployment layer's parameters (a runner for deployment sets its scenario's).
        self.deployment_config = DeploymentConfig()
        #: Messages sent over the whole run, by the class name of the layer that sent them.
        self.sent_by_layer: Counter[str] = Counter()
        self.prospect_results: list[bool] = []
        #: Each address's uptime history (kept on its disk), and the disk generation it belongs to.
        self.uptime = [UptimeHistory() for _ in range(nodes)]
        self._uptime_generation = [0] * nodes

    # -- building --------------------------------------------------------------------------
    def make_core(self, address: int) -> Protocol:
        host = self.sim.hosts[address]
        streams = self.sim.streams
        seed = (streams.bytes("identity", address) if self.generation[address] == 0
                else streams.bytes("identity", address, self.generation[address]))
        identity = Identity.from_seed(seed)
        old = self.node_ids[address]
        if identity.node_id != old:  # a new machine at this address (a permanent departure): its own key pair
            self.address_of.pop(old, None)
            self.node_ids[address] = identity.node_id
            self.address_of[identity.node_id] = address
        context = CoreContext(
            identity,
            address,
            streams.fresh("node", address, host.incarnation + 1),
            self.sim.now,
            self.config,
            contribution=self.contributions[address],
            prospector=self.prospector_config,
            persistence=self.pconfig,
            store=self.stores[address],
            detector=self.detector_config,
            deployment=self.deployment_config,
        )
        stack = _LayerMeteredStack(default_layers(context), self)
        self.stacks[address] = stack
        self.cores[address] = stack.layer(Kademlia)
        self._begin_session(address, stack)
        return stack

    # -- uptime ----------------------------------------------------------------------------
    def _begin_session(self, address: int, stack: Stack) -> None:
        """The node at ``address`` starts: a session begins in its history (a new one when the
        disk is new), its availability goes into the description, and its heartbeats start."""
        if self._uptime_generation[address] != self.generation[address]:
            self.uptime[address] = UptimeHistory()
            self._uptime_generation[address] = self.generation[address]
        history = self.uptime[address]
        now = self.sim.now
        history.begin(now)
        stack.layer(NodeDescription).set_availability(history.availability(now), now)
        incarnation = self.sim.hosts[address].incarnation + 1  # the host's once it starts this stack
        self.sim.engine.schedule(now + self.n["uptime_heartbeat_s"], self._heartbeat, address, incarnation)

    def _heartbeat(self, address: int, incarnation: int) -> None:
        host = self.sim.hosts[address]
        if not host.up or host.incarnation != incarnation:
            return  # that run of the node crashed: its heartbeats died with it
        history = self.uptime[address]
        now = self.sim.now
        history.record_heartbeat(now)
        availability = history.availability(now)
        host.call(partial(_set_availability, availability))
        self.sim.engine.schedule(now + self.n["uptime_heartbeat_s"], self._heartbeat, address, incarnation)

    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        raise AssertionError("the node runner builds whole stacks in make_core")

    def start(self) -> None:
        streams = self.sim.streams
        for host in self.sim.hosts:  # the executor serves the node across its restarts
            serve_node(host, streams.get("executor", host.address))
        super().start()
        engine = self.sim.engine
        window = self.settings["workload_window_s"]
        for _ in range(self.n["prospects"]):
            engine.schedule(self.workload_at + self.rng.uniform(0, window), self._prospect)

    def on_down(self, address: int) -> None:
        super().on_down(address)
        if not self.sim.hosts[address].up:
            self.stacks[address] = None

    # -- workload --------------------------------------------------------------------------
    def _prospect(self) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            return
        query = self.sim.hosts[address].call(partial(_prospect, self.requirement, self.n["prospect_n"]))
        self.pending_ops[(address, query)] = ("prospect", 0)

    def on_event(self, address: int, event: Any) -> None:
        if type(event) is ProspectFinished:
            if self.pending_ops.pop((address, event.query_id), None) is not None:
                matching = sum(1 for a, stack in enumerate(self.stacks)
                               if stack is not None and self.joined_at[a] is not None
                               and self.requirement.evaluate(stack.layer(Prospector).attributes))
                self.prospect_results.append(len(event.nodes) >= min(event.n, matching))
            return
        super().on_event(address, event)

    def meter_layers(self, stack: Stack, counts: Iterable[tuple[str, int]]) -> None:
        for name, count in counts:
            self.sent_by_layer[name] += count

    # -- results ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        out = super().summary()
        per_node_s = len(self.sim.hosts) * max(self.scenario.values["duration_s"], 1e-9)
        out.update({
            "prospects": len(self.prospect_results),
            "prospect_success": round(sum(self.prospect_results) / len(self.prospect_results), 6)
            if self.prospect_results else None,
            "messages_per_node_per_s": {name: round(count / per_node_s, 4)
                                        for name, count in sorted(self.sent_by_layer.items())},
        })
        return out


class _LayerMeteredStack(Stack):
    """A full node's stack that counts what each layer sends (and the persistence repair traffic)."""

    def __init__(self, layers: Iterable[Protocol], runner: NodeRunner) -> None:
        super().__init__(layers)
        self._runner = runner

    def messages_to_send(self) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        counts = []
        for layer in self.layers:
            sent = layer.messages_to_send()
            if sent:
                counts.append((type(layer).__name__, len(sent)))
                out.extend(sent)
        if out:
            self._runner.meter(out)
            self._runner.meter_layers(self, counts)
        return out


def _set_availability(fraction: float | None, core: Protocol, now: float) -> None:
    assert isinstance(core, Stack)
    core.layer(NodeDescription).set_availability(fraction, now)


def _prospect(requirement: Requirement, n: int, core: Protocol, now: float) -> int:
    assert isinstance(core, Stack)
    return core.layer(Prospector).prospect(requirement, n, now)
