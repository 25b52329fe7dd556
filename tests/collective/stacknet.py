"""A fake network of whole node stacks (Kademlia plus the layers above it) for unit tests.

Like ``tests/overlay/fakenet.py`` but every node is a :class:`p2pdeploy.core.Stack`, and each
message takes ``latency_s`` to arrive (a heap, so timeouts race with answers as on a network).
Messages are encoded and decoded on the way, so every test also proves the wire schema of what
the layers send. Nodes can crash (``crash``) and stay silent; ``loss`` drops datagrams at random.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from p2pdeploy import wire
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig
from p2pdeploy.overlay.routing import Contact

#: ``layers(overlay, rng) -> [layer, ...]``: what each node runs above its Kademlia layer.
Layers = Callable[[Kademlia, random.Random], list[Protocol]]


class StackNet:
    def __init__(self, layers: Layers, *, seed: int = 0, config: KademliaConfig | None = None,
                 latency_s: float = 0.01, jitter_s: float = 0.0, loss: float = 0.0) -> None:
        self.layers = layers
        self.rng = random.Random(seed)
        self.config = config or KademliaConfig(k=8, alpha=3)
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.nodes: dict[int, Stack] = {}
        self.overlays: dict[int, Kademlia] = {}
        self.down: set[int] = set()
        self.events: list[tuple[int, Any]] = []
        self.sent: list[tuple[int, int, Any]] = []  # (src, dst, msg) of every message sent
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0

    # -- building --------------------------------------------------------------------------
    def add(self) -> int:
        index = len(self.nodes)
        identity = Identity.from_seed(self.rng.randbytes(32))
        overlay = Kademlia(identity.node_id, random.Random(self.rng.getrandbits(64)), self.config)
        stack = Stack([overlay, *self.layers(overlay, random.Random(self.rng.getrandbits(64)))])
        self.nodes[index] = stack
        self.overlays[index] = overlay
        overlay.start(self.now)
        self.flush(index)
        return index

    def join_all(self, n: int) -> None:
        """``n`` nodes, each joining through the first with the real Kademlia bootstrap."""
        first = self.add()
        for _ in range(n - 1):
            index = self.add()
            self.call(index, lambda stack, now: stack.layer(Kademlia).bootstrap([first], now))
            self.run(until=self.now + 5.0)

    def fill_tables(self, n: int, *, omit: Callable[[int, int], bool] | None = None) -> None:
        """``n`` nodes whose routing tables already hold every other node (a warm start, as the
        simulator's oracle build), except the contacts ``j`` of node ``i`` that ``omit(i, j)`` names."""
        indices = [self.add() for _ in range(n)]
        for i in indices:
            for j in indices:
                if i != j and not (omit is not None and omit(i, j)):
                    self.overlays[i].table.add(Contact(self.overlays[j].node_id, j))

    def layer(self, index: int, cls: type) -> Any:
        return self.nodes[index].layer(cls)

    def index_of(self, node_id: int) -> int:
        return next(i for i, o in self.overlays.items() if o.node_id == node_id)

    # -- driving ---------------------------------------------------------------------------
    def call(self, index: int, api: Callable[[Stack, float], Any]) -> Any:
        result = api(self.nodes[index], self.now)
        self.flush(index)
        return result

    def crash(self, index: int) -> None:
        self.down.add(index)

    def flush(self, index: int) -> None:
        node = self.nodes[index]
        while (event := node.next_event(self.now)) is not None:
            self.events.append((index, event))
        for dst, msg in node.messages_to_send():
            data = wire.encode(msg)
            decoded = wire.decode(data, limit_bytes=wire.STREAM_LIMIT_BYTES)
            self.sent.append((index, dst, decoded))
            if self.loss and len(data) <= wire.DATAGRAM_LIMIT_BYTES and self.rng.random() < self.loss:
                continue
            self._seq += 1
            delay = self.latency_s + (self.rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
            heapq.heappush(self._heap, (self.now + delay, self._seq, index, dst, decoded))

    def run_until(self, condition: Callable[[], bool], max_steps: int = 10**6) -> None:
        """Deliver messages and fire timers one at a time until ``condition()`` holds."""
        for _ in range(max_steps):
            if condition():
                return
            if not self._step(float("inf")):
                break
        assert condition(), "the condition never held"

    def _step(self, limit: float) -> bool:
        """Handle the next message or timer due by ``limit``; False when there is none."""
        next_message = self._heap[0][0] if self._heap else None
        timers = [(d, i) for i, n in self.nodes.items() if i not in self.down and (d := n.next_deadline()) is not None]
        next_timer = min(timers) if timers else None
        if next_message is not None and next_message <= limit and (next_timer is None or next_message <= next_timer[0]):
            at, _, src, dst, msg = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            if dst not in self.down and dst in self.nodes:
                self.nodes[dst].receive(src, msg, self.now)
                self.flush(dst)
            return True
        if next_timer is not None and next_timer[0] <= limit:
            self.now = max(self.now, next_timer[0])
            self.nodes[next_timer[1]].handle_timer(self.now)
            self.flush(next_timer[1])
            return True
        return False

    def run(self, until: float | None = None, max_steps: int = 10**7) -> None:
        """Deliver messages and fire timers in time order up to ``until``; without ``until``,
        until no message is in flight (timers due before the last arrival fire on the way)."""
        for _ in range(max_steps):
            if until is None and not self._heap:
                return
            if not self._step(float("inf") if until is None else until):
                if until is not None:
                    self.now = max(self.now, until)
                return
        raise AssertionError("the network did not settle")

    def events_of(self, cls: type, index: int | None = None) -> list[Any]:
        return [e for i, e in self.events if isinstance(e, cls) and (index is None or i == index)]

    def received(self, cls: type) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for i, e in self.events:
            if isinstance(e, cls):
                out.setdefault(i, []).append(e)
        return out
