"""The simulator's driver for one node: hosts a sans-I/O core on the event heap.

A :class:`SimNode` turns heap events into core calls and core output into heap events, with
the driver contract every driver follows (see :mod:`p2pdeploy.core`): after each input (a
delivered message, a timer, an API call made by the scenario) it drains the core's events
(to the observer), then its messages (to the :class:`~p2pdeploy.sim.network.Network`), then
reads ``next_deadline()`` and arms one timer event when the deadline changed. A timer is never
cancelled on the heap: when it fires it is ignored unless its deadline is still the one armed
(lazy invalidation), and the core sees ``now = max(deadline, clock)``.

A node is up while it hosts a core. :meth:`SimNode.crash` discards the core (what churn does:
a crash loses all state that is not in the data directory), :meth:`SimNode.start` hosts a new
one (a rejoin). Messages that arrive while the node is down are dropped by the network.

It makes no protocol decisions and models nothing: latency and loss are the network's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from p2pdeploy.core import Protocol

if TYPE_CHECKING:
    from p2pdeploy.sim.engine import Engine
    from p2pdeploy.sim.network import Network

#: ``observer(address, event)``: receives every event a hosted core emits.
Observer = Callable[[int, Any], None]
T = TypeVar("T")


def _ignore(address: int, event: Any) -> None:
    pass


class NodeDown(Exception):
    """An API call was made on a node that hosts no core (it is down)."""


class SimNode:
    """One simulated machine: an integer address and, while it is up, a protocol core."""

    __slots__ = (
        "address",
        "engine",
        "network",
        "observer",
        "core",
        "incarnation",
        "stale_timers",
        "_armed",
        "_fire_cb",
        "_paused",
    )

    def __init__(self, address: int, engine: Engine, network: Network, observer: Observer | None = None) -> None:
        self.address = address
        self.engine = engine
        self.network = network
        self.observer: Observer = observer or _ignore
        #: The hosted core, or ``None`` while the node is down.
        self.core: Protocol | None = None
        #: How many cores this node has hosted (1 after the first start).
        self.incarnation = 0
        #: Timer events that fired after their deadline had moved (lazy invalidation).
        self.stale_timers = 0
        self._armed: float | None = None
        self._fire_cb = self._fire
        self._paused: Protocol | None = None

    @property
    def up(self) -> bool:
        return self.core is not None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, core: Protocol) -> None:
        """Host ``core`` (first start or rejoin) and drain whatever it queued when built."""
        if self.core is not None:
            raise RuntimeError(f"node {self.address} is already up; crash it before starting a new core")
        self.core = core
        self.incarnation += 1
        self._armed = None
        self._flush(core)

    def crash(self) -> Protocol | None:
        """Discard the core (its pending timers die with it, a paused one too); return it for inspection."""
        core, self.core = self.core, None
        if core is None:
            core, self._paused = self._paused, None
        self._armed = None
        return core

    def pause(self) -> None:
        """Stop the node without losing its core (a process stopped, a long GC pause, a VM frozen).

        While paused the node is down to everyone: the network drops what arrives for it (counted
        as ``down``), its timers do not fire and API calls raise :class:`NodeDown`. Nothing is
        queued. :meth:`resume` brings the same core back.
        """
        if self.core is None:
            raise RuntimeError(f"node {self.address} is not up; only a running node can be paused")
        self._paused, self.core = self.core, None
        self._armed = None

    def resume(self) -> None:
        """Run the paused core again: its due timers fire now (late), as after a real pause."""
        core, self._paused = self._paused, None
        if core is None or self.core is not None:
            raise RuntimeError(f"node {self.address} is not paused")
        self.core = core
        self._flush(core)

    # -- inputs ----------------------------------------------------------------------------
    def call(self, api: Callable[[Any, float], T]) -> T:
        """Make an API call on the core, ``api(core, now)``, then drain its output.

        ``node.call(lambda core, now: core.ping(3, now))`` is how a scenario drives a node.
        """
        core = self.core
        if core is None:
            raise NodeDown(f"node {self.address} is down")
        result = api(core, self.engine.now)
        self._flush(core)
        return result

    def deliver(self, src: int, msg: Any) -> None:
        """A message arrived (the network checked that the node is up)."""
        core = self.core
        assert core is not None
        core.receive(src, msg, self.engine.now)
        self._flush(core)

    def _fire(self, deadline: float) -> None:
        if deadline != self._armed:
            self.stale_timers += 1
            return
        core = self.core
        assert core is not None  # crash() disarms
        self._armed = None
        now = self.engine.now
        core.handle_timer(deadline if deadline > now else now)
        self._flush(core)

    # -- output ----------------------------------------------------------------------------
    def _flush(self, core: Protocol) -> None:
        now = self.engine.now
        event = core.next_event(now)
        if event is not None:
            observer = self.observer
            address = self.address
            while event is not None:
                observer(address, event)
                event = core.next_event(now)
            if self.core is not core:  # the observer crashed this node
                return
        out = core.messages_to_send()
        if out:
            self.network.send(self.address, out)
        deadline = core.next_deadline()
        if deadline != self._armed:
            self._armed = deadline
            if deadline is not None:
                engine = self.engine
                engine.schedule(deadline if deadline > engine.now else engine.now, self._fire_cb, deadline)
