"""The simulator as a test network: whole node stacks on :class:`p2pdeploy.sim.Simulation`.

Every node is a :class:`~p2pdeploy.core.Stack` of the Kademlia overlay and the layers a test
names, hosted by a simulated machine (:class:`~p2pdeploy.sim.host.SimNode`), so tests drive the
same driver contract, network model and wire codec as scenario runs: messages are encoded and
decoded on the way (every test also proves the wire schema of what it sends), take a constant
``latency_s`` (plus up to ``jitter_s``) to arrive, are lost with probability ``loss`` when they
are datagrams, and are dropped across a :meth:`SimNet.partition`. ``latency_s=0`` is an instant
FIFO link, as h11's ``ConnectionPair``.

:class:`SimNet` builds the network node by node: :meth:`~SimNet.add` (or :meth:`~SimNet.join_all`
through the real bootstrap, or :meth:`~SimNet.fill_tables` with routing tables filled as an oracle),
:meth:`~SimNet.call` an API on a node, :meth:`~SimNet.run` in virtual time, :meth:`~SimNet.crash`
and :meth:`~SimNet.restart`. Every event a node emits is kept in ``events``, every message it
sends in ``sent``. :class:`StorageNet` is a network of nodes running replicated persistence,
whose stores (their disks) survive a crash.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from p2pdeploy.collective.persistence import MemoryStore, Persistence, PersistenceConfig
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import OverlayStore
from p2pdeploy.sim import NetworkConfig, Simulation

#: ``layers(overlay, rng) -> [layer, ...]``: what each node runs above its Kademlia layer.
Layers = Callable[[Kademlia, random.Random], list[Protocol]]


class _NodeStack(Stack):
    """A node's stack whose outgoing messages the test network records in ``sent``."""

    def __init__(self, layers: Iterable[Protocol], sent: list[tuple[int, Any, Any]], address: int) -> None:
        super().__init__(layers)
        self._sent = sent
        self._address = address

    def messages_to_send(self) -> list[tuple[Any, Any]]:
        out = super().messages_to_send()
        self._sent.extend((self._address, dst, msg) for dst, msg in out)
        return out


class SimNet:
    """Up to ``capacity`` simulated nodes (addresses ``0 ..``), added one by one."""

    def __init__(
        self,
        layers: Layers | None = None,
        *,
        capacity: int = 256,
        seed: int = 0,
        config: KademliaConfig | None = None,
        latency_s: float = 0.01,
        jitter_s: float = 0.0,
        loss: float = 0.0,
    ) -> None:
        network = NetworkConfig(latency_model="constant", base_latency_ms=latency_s * 1000.0,
                                jitter_ms=jitter_s * 1000.0, loss=loss)
        self.sim = Simulation(capacity, seed=seed, network=network, trace=False, per_node_metrics=False)
        self.sim.set_observer(self._observe)
        self.layers = layers
        self.config = config or KademliaConfig(k=8, alpha=3)
        #: Node ids by address, kept across crashes (a restarted node keeps its id).
        self.node_ids: dict[int, int] = {}
        #: The stack and overlay each node runs (the last ones it ran, while it is down).
        self.nodes: dict[int, Stack] = {}
        self.overlays: dict[int, Kademlia] = {}
        #: ``(address, event)`` of every event a node emitted; ``(src, dst, msg)`` of every message sent.
        self.events: list[tuple[int, Any]] = []
        self.sent: list[tuple[int, Any, Any]] = []
        self._marks: dict[tuple[int, int], int] = {}

    def _observe(self, address: int, event: Any) -> None:
        self.events.append((address, event))

    @property
    def now(self) -> float:
        return self.sim.now

    @property
    def down(self) -> set[int]:
        """The addresses of nodes that were added and are down now."""
        return {a for a in self.nodes if not self.sim.hosts[a].up}

    def up(self, address: int) -> bool:
        return self.sim.hosts[address].up

    # -- building --------------------------------------------------------------------------
    def add(self, *, node_id: int | None = None) -> int:
        """Start a node at the next free address (with ``node_id``, else one from its key); its address."""
        address = len(self.node_ids)
        if address >= len(self.sim.hosts):
            raise ValueError(f"the network holds {len(self.sim.hosts)} nodes: pass a larger capacity")
        if node_id is None:
            node_id = self.identity_of(address).node_id
        self.node_ids[address] = node_id
        self._start(address)
        return address

    def identity_of(self, address: int) -> Identity:
        """The key pair of the node at ``address`` (drawn from the seed)."""
        return Identity.from_seed(self.sim.streams.bytes("identity", address))

    def build_layers(self, address: int, overlay: Kademlia, incarnation: int) -> list[Protocol]:
        """The layers above ``overlay`` of node ``address`` (a subclass may build them otherwise)."""
        if self.layers is None:
            return []
        return self.layers(overlay, self.sim.streams.fresh("layers", address, incarnation))

    def _start(self, address: int, overlay_store: OverlayStore | None = None) -> None:
        host = self.sim.hosts[address]
        incarnation = host.incarnation + 1
        identity = self.identity_of(address)  # a node given another id has no key to answer challenges with
        overlay = Kademlia(self.node_ids[address], self.sim.streams.fresh("node", address, incarnation), self.config,
                           store=overlay_store, identity=identity if identity.node_id == self.node_ids[address] else None)
        self.prepare(address, overlay)
        stack = _NodeStack([overlay, *self.build_layers(address, overlay, incarnation)], self.sent, address)
        self.nodes[address] = stack
        self.overlays[address] = overlay
        host.start(stack)
        host.call(lambda core, now: overlay.start(now))

    def prepare(self, address: int, overlay: Kademlia) -> None:
        """Called with a node's new overlay before it starts (a subclass fills its table here)."""

    def join_all(self, n: int, *, settle_s: float = 5.0) -> None:
        """``n`` nodes, each joining through the first with the real Kademlia bootstrap and
        ``settle_s`` seconds of running after it."""
        first = self.add()
        for _ in range(n - 1):
            address = self.add()
            self.call(address, "bootstrap", [first])
            self.run(until=self.now + settle_s)

    def fill_tables(self, n: int, *, omit: Callable[[int, int], bool] | None = None) -> None:
        """``n`` nodes whose routing tables already hold every other node (a warm start, as the
        simulator's oracle build), except the contacts ``j`` of node ``i`` that ``omit(i, j)`` names."""
        addresses = [self.add() for _ in range(n)]
        for i in addresses:
            for j in addresses:
                if i != j and not (omit is not None and omit(i, j)):
                    self.overlays[i].table.add(Contact(self.node_ids[j], j))

    def layer(self, address: int, cls: type) -> Any:
        return self.nodes[address].layer(cls)

    def index_of(self, node_id: int) -> int:
        return next(a for a, i in self.node_ids.items() if i == node_id)

    # -- driving ---------------------------------------------------------------------------
    def call(self, address: int, api: Callable[[Stack, float], Any] | str, *args: Any, **kwargs: Any) -> Any:
        """``api(stack, now)`` on node ``address``, its output drained; a name calls that method
        of the node's overlay: ``call(3, "lookup", target)`` is ``overlay.lookup(target, now=now)``."""
        mark = len(self.events)
        if isinstance(api, str):
            method = api

            def api(stack: Stack, now: float) -> Any:
                return getattr(stack.layer(Kademlia), method)(*args, now=now, **kwargs)

        result = self.sim.hosts[address].call(api)
        if isinstance(result, int):  # a query id: its event is among those emitted from now on
            self._marks[(address, result)] = mark
        return result

    def crash(self, address: int) -> None:
        """The node stops at once and stays silent; what it held in memory is gone."""
        self.sim.hosts[address].crash()

    def restart(self, address: int, *, keep_overlay_store: bool = False) -> None:
        """A crashed node starts again with the same id and an empty routing table; with
        ``keep_overlay_store`` its overlay keeps the values it held and published (a durable store)."""
        if not self.up(address):
            self._start(address, self.overlays[address].store if keep_overlay_store else None)

    def pause(self, address: int) -> None:
        """The node freezes with its state (see :meth:`p2pdeploy.sim.host.SimNode.pause`)."""
        self.sim.hosts[address].pause()

    def resume(self, address: int) -> None:
        self.sim.hosts[address].resume()

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Split the network (see :meth:`p2pdeploy.sim.network.Network.partition`)."""
        self.sim.network.partition(groups)

    def heal(self) -> None:
        self.sim.network.heal()

    def in_flight(self) -> int:
        """Messages sent and neither delivered nor dropped yet."""
        network = self.sim.network
        return network.sent - network.delivered - sum(network.dropped.values())

    def run(self, until: float | None = None) -> None:
        """Deliver messages and fire timers in time order up to ``until`` (inclusive); without
        ``until``, until no message is in flight (timers due before the last arrival fire on the way)."""
        engine = self.sim.engine
        if until is None:
            while self.in_flight():
                engine.step()
            return
        self.sim.run(until=until)
        while engine.peek() <= until:
            engine.step()

    def run_for(self, seconds: float) -> None:
        self.run(until=self.now + seconds)

    def run_until(self, condition: Callable[[], bool], timeout_s: float = 3600.0) -> None:
        """Deliver messages and fire timers one at a time until ``condition()`` holds."""
        engine = self.sim.engine
        deadline = self.now + timeout_s
        while not condition() and engine.peek() <= deadline:
            engine.step()
        assert condition(), "the condition never held"

    # -- what happened ---------------------------------------------------------------------
    def events_of(self, cls: type, address: int | None = None) -> list[Any]:
        return [e for a, e in self.events if isinstance(e, cls) and (address is None or a == address)]

    def received(self, cls: type) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for a, e in self.events:
            if isinstance(e, cls):
                out.setdefault(a, []).append(e)
        return out

    def finished(self, cls: type, query_id: int, address: int) -> Any:
        """The ``cls`` event node ``address`` emitted for ``query_id`` (the test fails without one)."""
        start = self._marks.get((address, query_id), 0)  # a restarted node counts its queries from 1 again
        matches = [e for a, e in self.events[start:]
                   if a == address and isinstance(e, cls) and e.query_id == query_id]
        assert matches, f"no {cls.__name__} for query {query_id} on node {address}"
        return matches[-1]

    def result(self, address: int, query_id: int, cls: type, timeout_s: float = 600.0, step_s: float = 0.5) -> Any:
        """Run until node ``address`` emitted the ``cls`` event of ``query_id``; that event."""
        deadline = self.now + timeout_s
        start = self._marks.get((address, query_id), 0)
        while True:
            for where, event in self.events[start:]:
                if where == address and isinstance(event, cls) and event.query_id == query_id:
                    return event
            if self.now >= deadline:
                raise AssertionError(f"no {cls.__name__} for query {query_id} on node {address} after {timeout_s} s")
            self.run_for(step_s)


class StorageNet(SimNet):
    """``nodes`` nodes running Kademlia and replicated persistence, all started at once.

    Routing tables start full (every node knows every other, again after a restart), and the
    stores are the nodes' disks: they survive :meth:`crash`, so a restarted node serves what it
    held. :meth:`call` hands the API the node's :class:`Persistence` layer. The members trust
    one another's keys and those in ``trusting``, but not the keys of the ``strangers`` (addresses).
    """

    def __init__(
        self,
        nodes: int,
        *,
        seed: int = 0,
        config: PersistenceConfig | None = None,
        kademlia: KademliaConfig | None = None,
        latency_s: float = 0.01,
        strangers: frozenset[int] = frozenset(),
        trusting: frozenset[bytes] = frozenset(),
        capacity_bytes: int = 1 << 40,
    ) -> None:
        super().__init__(capacity=nodes, seed=seed, config=kademlia or KademliaConfig(k=8), latency_s=latency_s)
        self.persistence_config = config or PersistenceConfig()
        self.stores = [MemoryStore(capacity_bytes) for _ in range(nodes)]
        self.trusted_keys = trusting | {self.identity_of(a).public_key for a in range(nodes) if a not in strangers}
        for address in range(nodes):  # every id first: each table is filled with all of them
            self.node_ids[address] = self.identity_of(address).node_id
        for address in range(nodes):
            self._start(address)

    def node_id(self, address: int) -> int:
        return self.node_ids[address]

    def prepare(self, address: int, overlay: Kademlia) -> None:
        for other in range(len(self.stores)):
            if other != address:
                overlay.table.add(Contact(self.node_id(other), other))

    def build_layers(self, address: int, overlay: Kademlia, incarnation: int) -> list[Protocol]:
        rng = self.sim.streams.fresh("persistence", address, incarnation)
        return [Persistence(overlay, self.stores[address], rng, self.now, own_address=address,
                            config=self.persistence_config, identity=self.identity_of(address),
                            trusted_keys=self.trusted_keys)]

    def persistence(self, address: int) -> Persistence:
        core = self.sim.hosts[address].core
        assert core is not None, f"node {address} is down"
        return core.layer(Persistence)

    def call(self, address: int, api: Any, *args: Any, **kwargs: Any) -> Any:
        """``api(persistence, now)`` on node ``address`` (its output is drained)."""
        return super().call(address, lambda stack, now: api(stack.layer(Persistence), now))

    def holders(self, key: int) -> list[int]:
        """Addresses whose store holds a copy of the chunk or record ``key`` (up or down)."""
        return [a for a, s in enumerate(self.stores)
                if s.chunk_info(key) is not None or s.read_record(key) is not None]

    def closest(self, key: int, count: int, *, live_only: bool = True) -> list[int]:
        addresses = [a for a in range(len(self.stores)) if self.up(a) or not live_only]
        return sorted(addresses, key=lambda a: self.node_id(a) ^ key)[:count]
