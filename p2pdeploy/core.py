"""The sans-I/O contract every protocol object follows, and a stack that hosts several.

A protocol object is a synchronous state machine (after aioquic and h11). Its inputs are
``receive(src, msg, now)``, ``handle_timer(now)`` and API calls that only queue work; its
outputs, which a driver drains after every input, are ``messages_to_send()``,
``next_event()`` and ``next_deadline()``. It never reads a clock, draws global randomness or
touches a socket: ``now`` is passed in and a ``random.Random`` is handed to it.

Drivers (``p2pdeploy.runtime`` on trio, ``p2pdeploy.sim`` on virtual time) follow one loop:
after each input drain events (``next_event(now)``), then messages, then read the deadline; when
a timer fires they call ``handle_timer(max(deadline, clock))`` so a core never sees an early time.

Layers talk the way HTTP/3 talks to QUIC. Downward, a layer holds the layers below it and calls
their commands and read-only views. Upward, a layer names the event classes of lower layers it
consumes (``consumes``) and a :class:`Stack` offers each such event to it
(``handle_event(event, now)``) before the driver sees it; an event no layer consumed reaches the
driver. No callbacks are handed down.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar
from typing import Protocol as _TypingProtocol

Address = Hashable
K = TypeVar("K", bound=Hashable)
P = TypeVar("P", bound="Protocol")


class Rng(_TypingProtocol):
    """The part of ``random.Random`` a core uses; the driver hands in a seeded instance."""

    def random(self) -> float: ...
    def getrandbits(self, k: int, /) -> int: ...
    def randrange(self, start: int, stop: int | None = ..., step: int = ..., /) -> int: ...
    def uniform(self, a: float, b: float, /) -> float: ...
    def choice(self, seq: Any, /) -> Any: ...
    def sample(self, population: Any, k: int, /) -> list[Any]: ...
    def shuffle(self, x: list[Any], /) -> None: ...
    def expovariate(self, lambd: float, /) -> float: ...


class Protocol:
    """Base class: output buffers and a timer set shared by every protocol object.

    Subclasses call ``self.send(dst, msg)``, ``self.emit(event)`` and
    ``self.set_timer(name, deadline)``; ``handle_timer`` calls ``on_timer(name, now)`` for each
    named timer that is due. ``handles`` lists the message classes this protocol receives, so a
    :class:`Stack` can route to it.
    """

    handles: tuple[type, ...] = ()
    #: Event classes of lower layers this protocol consumes: a :class:`Stack` offers each to
    #: :meth:`handle_event` (subclasses included) before the driver sees it.
    consumes: tuple[type, ...] = ()

    def __init__(self) -> None:
        self._outbox: list[tuple[Address, Any]] = []
        self._events: deque[Any] = deque()
        self._timers: dict[Hashable, float] = {}
        self._timer_heap: list[tuple[float, int, Hashable]] = []
        self._timer_seq = 0
        #: Inputs dropped by kind (malformed, unexpected, ...): a peer's bad input is counted, never raised.
        self.dropped: Counter[str] = Counter()

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        """Run every timer whose deadline is at or before ``now``."""
        heap = self._timer_heap
        while heap and heap[0][0] <= now:
            deadline, _, name = heapq.heappop(heap)
            if self._timers.get(name) != deadline:
                continue  # cancelled or moved
            del self._timers[name]
            self.on_timer(name, now)

    def on_timer(self, name: Hashable, now: float) -> None:
        raise NotImplementedError

    def handle_event(self, event: Any, now: float) -> bool:
        """An event of a lower layer, of a class named in ``consumes``.

        Return True when it is consumed (it was this layer's: the result of a query it started,
        a message for a group it joined): it goes no further. Return False to let it go on to
        the layers above and the driver (a layer may look at an event without consuming it).
        """
        return False

    # -- outputs ---------------------------------------------------------------------------
    def messages_to_send(self) -> list[tuple[Address, Any]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self, now: float | None = None) -> Any | None:
        """The next event for the driver. ``now`` matters only to a :class:`Stack`, whose upper
        layers handle the events of lower ones at that time."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        heap = self._timer_heap
        while heap and self._timers.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # discard cancelled entries lazily
        return heap[0][0] if heap else None

    # -- helpers for subclasses ------------------------------------------------------------
    def send(self, dst: Address, msg: Any) -> None:
        self._outbox.append((dst, msg))

    def emit(self, event: Any) -> None:
        self._events.append(event)

    def set_timer(self, name: Hashable, deadline: float) -> None:
        """Arm (or move) the timer ``name`` to fire at the absolute time ``deadline``."""
        self._timers[name] = deadline
        self._timer_seq += 1
        heapq.heappush(self._timer_heap, (deadline, self._timer_seq, name))

    def cancel_timer(self, name: Hashable) -> None:
        self._timers.pop(name, None)

    def timer_deadline(self, name: Hashable) -> float | None:
        return self._timers.get(name)


class Stack(Protocol):
    """Several protocol objects sharing one node: routes messages by type, passes events up, merges outputs.

    ``layers`` are listed bottom to top. A message goes to the layer that ``handles`` its type.
    An event of layer ``i`` is offered, in order, to each layer above ``i`` whose ``consumes``
    names its class; the first that consumes it ends its way, and what no layer consumes is
    returned to the driver by :meth:`next_event`. A layer handling an event may call the
    commands of the layers below it (a lookup, a send); the events that causes are offered in
    the same drain.
    """

    def __init__(self, layers: Iterable[Protocol]) -> None:
        super().__init__()
        self.layers = list(layers)
        self._route: dict[type, Protocol] = {}
        for layer in self.layers:
            for cls in layer.handles:
                if cls in self._route:
                    raise ValueError(f"{cls.__name__} is handled by two layers")
                self._route[cls] = layer
        #: event class -> the (index, layer) pairs that consume it, bottom to top (filled lazily).
        self._consumers: dict[type, list[tuple[int, Protocol]]] = {}
        #: The latest time an input carried: events drained without a time are handled at it.
        self._now: float | None = None
        #: Events consumed by a layer above the one that emitted them, by event class name.
        self.consumed: Counter[str] = Counter()
        # The driver drains the stack after every input, and most layers have nothing queued:
        # a layer that keeps the base class's buffers is looked at directly, without a call.
        # The order of the output is the order of the layers, as if each were asked in turn.
        self._plain_outbox = [_inherits(layer, "messages_to_send") for layer in self.layers]
        self._plain_events = [_inherits(layer, "next_event") for layer in self.layers]
        self._plain_timers = [_inherits(layer, "next_deadline") for layer in self.layers]

    def receive(self, src: Address, msg: Any, now: float) -> None:
        self._now = now
        layer = self._route.get(type(msg))
        if layer is None:
            self.dropped["unexpected"] += 1
            return
        layer.receive(src, msg, now)

    def handle_timer(self, now: float) -> None:
        self._now = now
        for layer in self.layers:
            deadline = layer.next_deadline()
            if deadline is not None and deadline <= now:
                layer.handle_timer(now)

    def messages_to_send(self) -> list[tuple[Address, Any]]:
        out: list[tuple[Address, Any]] = []
        for layer, plain in zip(self.layers, self._plain_outbox, strict=True):
            if not plain:
                out.extend(layer.messages_to_send())
            elif layer._outbox:
                out.extend(layer._outbox)
                layer._outbox = []
        return out

    def next_event(self, now: float | None = None) -> Any | None:
        if now is not None:
            self._now = now
        layers = self.layers
        plain_events = self._plain_events
        index = 0
        while index < len(layers):
            layer = layers[index]
            if plain_events[index]:
                queued = layer._events
                event = queued.popleft() if queued else None
            else:
                event = layer.next_event()
            if event is None:
                index += 1
                continue
            if not self._offer(index, event):
                return event
            index = 0  # the consumer may have called layers below it: their events come first
        return None

    def _offer(self, index: int, event: Any) -> bool:
        cls = type(event)
        consumers = self._consumers.get(cls)
        if consumers is None:
            consumers = self._consumers[cls] = [
                (i, layer) for i, layer in enumerate(self.layers) if layer.consumes and issubclass(cls, layer.consumes)
            ]
        if not consumers:
            return False
        now = self._now
        if now is None:
            raise RuntimeError("a Stack handles events at the time of an input: pass now to next_event")
        for i, layer in consumers:
            if i > index and layer.handle_event(event, now):
                self.consumed[cls.__name__] += 1
                return True
        return False

    def next_deadline(self) -> float | None:
        earliest = None
        for layer, plain in zip(self.layers, self._plain_timers, strict=True):
            if plain:  # Protocol.next_deadline without the call, unless the top timer was cancelled or moved
                heap = layer._timer_heap
                if not heap:
                    continue
                deadline, _, name = heap[0]
                if layer._timers.get(name) != deadline:
                    deadline = layer.next_deadline()
            else:
                deadline = layer.next_deadline()
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def layer(self, cls: type) -> Any:
        """The layer that is an instance of ``cls``."""
        for layer in self.layers:
            if isinstance(layer, cls):
                return layer
        raise KeyError(cls.__name__)


def _inherits(layer: Protocol, method: str) -> bool:
    """Whether ``layer`` uses :class:`Protocol`'s own ``method`` (and so its buffers as they are)."""
    return getattr(type(layer), method) is getattr(Protocol, method)


class KeyedChildren(Generic[K, P]):
    """Child protocol objects of one owner, by key: a replica's supervisor in the replica host,
    a service's manager in a deployer.

    The owner holds them here and stays the one protocol a stack sees: its ``next_deadline``
    includes :meth:`next_deadline`, its ``handle_timer`` calls :meth:`handle_timer`, and after
    each input it calls :meth:`drain` to move the children's events and messages into its own
    buffers (in key order of insertion, so a run is reproducible).
    """

    def __init__(self) -> None:
        self._children: dict[K, P] = {}

    def __getitem__(self, key: K) -> P:
        return self._children[key]

    def __setitem__(self, key: K, child: P) -> None:
        self._children[key] = child

    def __delitem__(self, key: K) -> None:
        del self._children[key]

    def __contains__(self, key: object) -> bool:
        return key in self._children

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[K]:
        return iter(self._children)

    def get(self, key: K) -> P | None:
        return self._children.get(key)

    def items(self) -> Iterator[tuple[K, P]]:
        return iter(list(self._children.items()))

    def values(self) -> list[P]:
        return list(self._children.values())

    def next_deadline(self) -> float | None:
        """The earliest deadline among the children."""
        deadlines = [d for d in (child.next_deadline() for child in self._children.values()) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Run the timers of every child whose deadline is due."""
        for child in list(self._children.values()):
            deadline = child.next_deadline()
            if deadline is not None and deadline <= now:
                child.handle_timer(now)

    def drain(self, owner: Protocol) -> None:
        """Move every child's events and messages into ``owner``'s buffers."""
        for child in self._children.values():
            while (event := child.next_event()) is not None:
                owner.emit(event)
            for dst, msg in child.messages_to_send():
                owner.send(dst, msg)


# -- configuration checks -------------------------------------------------------------------
# The frozen configuration dataclasses of every layer check their fields in ``__post_init__``
# with these, so that every layer words a bad value the same way:
# ``kademlia.k must be >= 1 (got 0)``.


def require_positive(config: Any, prefix: str, *names: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` for the first of ``names`` whose value on ``config`` is not > 0.

    ``prefix`` starts the message (``"kademlia."`` names the field ``kademlia.rpc_timeout_s``);
    NaN is refused too.
    """
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise error(f"{prefix}{name} must be > 0 (got {value})")


def require_at_least(
    config: Any, prefix: str, minimum: int, *names: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` for the first of ``names`` whose value on ``config`` is below ``minimum``
    (or NaN); the message reads as :func:`require_positive`'s."""
    for name in names:
        value = getattr(config, name)
        if not value >= minimum:
            raise error(f"{prefix}{name} must be >= {minimum} (got {value})")
