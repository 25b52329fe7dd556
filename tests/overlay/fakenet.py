"""A fake link for unit tests (after h11's ConnectionPair): instant FIFO delivery between cores.

Messages are encoded and decoded on the way, so every test also proves the wire schema of
what it sends. Time advances only to the next deadline when nothing is in flight.
"""

from __future__ import annotations

import random
from collections import deque

from p2pdeploy import wire
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig


class FakeNet:
    def __init__(self, seed: int = 0, config: KademliaConfig | None = None) -> None:
        self.rng = random.Random(seed)
        self.config = config or KademliaConfig(k=8, alpha=3)
        self.nodes: dict[int, Kademlia] = {}
        self.down: set[int] = set()
        self.queue: deque = deque()
        self.events: list = []
        self.now = 0.0
        self.delivered = 0

    def add(self, index: int | None = None) -> Kademlia:
        index = len(self.nodes) if index is None else index
        identity = Identity.from_seed(self.rng.randbytes(32))
        node = Kademlia(identity.node_id, random.Random(self.rng.getrandbits(64)), self.config)
        node.address = index
        node.identity = identity
        self.nodes[index] = node
        node.start(self.now)
        return node

    def flush(self, index: int) -> None:
        node = self.nodes[index]
        while (event := node.next_event(self.now)) is not None:
            self.events.append((index, event))
        for dst, msg in node.messages_to_send():
            data = wire.encode(msg)
            self.queue.append((index, dst, wire.decode(data, limit_bytes=wire.STREAM_LIMIT_BYTES)))

    def call(self, index: int, method: str, *args, **kwargs):
        result = getattr(self.nodes[index], method)(*args, now=self.now, **kwargs)
        self.flush(index)
        return result

    def run(self, until: float | None = None, max_steps: int = 10**6) -> None:
        """Deliver until quiet; then fire timers up to ``until`` (default: only what is due)."""
        for _ in range(max_steps):
            if self.queue:
                src, dst, msg = self.queue.popleft()
                if dst in self.down or dst not in self.nodes:
                    continue
                self.delivered += 1
                self.nodes[dst].receive(src, msg, self.now)
                self.flush(dst)
                continue
            due = [(d, i) for i, n in self.nodes.items() if i not in self.down and (d := n.next_deadline()) is not None]
            if not due:
                return
            deadline, index = min(due)
            if until is None or deadline > until:
                if until is not None:
                    self.now = max(self.now, until)
                return
            self.now = max(self.now, deadline)
            self.nodes[index].handle_timer(self.now)
            self.flush(index)
        raise AssertionError("network did not go quiet")

    def finished(self, cls, query_id: int, index: int):
        matches = [e for i, e in self.events if i == index and isinstance(e, cls) and e.query_id == query_id]
        assert matches, f"no {cls.__name__} for query {query_id} on node {index}"
        return matches[-1]

    def join_all(self, n: int) -> None:
        first = self.add()
        for _ in range(n - 1):
            node = self.add()
            self.call(node.address, "bootstrap", [first.address])
            self.run(until=self.now + 10.0)
