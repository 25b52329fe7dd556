"""The trio driver of one node: real sockets and real time in, core calls out, and an async facade.

A :class:`RuntimeNode` owns a :class:`~p2pdeploy.runtime.transport.Transport` (one UDP socket
and one TCP listener on the same address) and hosts one sans-I/O core, a
:class:`p2pdeploy.core.Stack` built by :mod:`p2pdeploy.runtime.layers`. It follows the driver
contract of ``core.py``: after every input (a datagram, a frame, a timer, an API call) it
drains the core's events, then its messages, then reads its next deadline and re-arms its one
timer. Core times are ``trio.current_time()`` seconds. It makes no protocol decision: which
peer to ping, when a ping is lost and what an RTT is are the core's.

The facade turns core events into awaitable results: :meth:`RuntimeNode.request` runs a core
API call and waits for the event that finishes it, which is how ``ping`` is written and how a
later layer's ``lookup`` or ``deploy`` will be. Use it through :func:`open_node`::

    async with open_node(listen=("127.0.0.1", 0), data_dir=path, bootstrap=[seed]) as node:
        rtt_s = await node.ping(("127.0.0.1", 7400))
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket as stdlib_socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from p2pdeploy import wire
from p2pdeploy.core import Stack
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.ping import PeerSeen, Ping, PingProtocol, PingTimedOut, PongReceived
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.layers import CoreContext, LayersFactory, build_core, default_layers
from p2pdeploy.runtime.transport import Transport, TransportConfig, path_for

log = logging.getLogger(__name__)

T = TypeVar("T")


class PingTimeout(TimeoutError):
    """No pong came back: the ping protocol gave up on it, or the caller's ``timeout_s`` ran out."""

    def __init__(self, address: HostPort, waited_s: float) -> None:
        super().__init__(f"no pong from {format_host_port(address)} after {waited_s:.2f} s")
        self.address = address
        self.waited_s = waited_s


class NodeNotRunning(RuntimeError):
    """The facade was used before the node started or after it stopped."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Tuning knobs of a node (configuration, never private attributes poked from outside)."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    #: Events buffered per subscriber; when a subscriber falls behind, newer events are dropped and counted.
    event_buffer: int = 1024
    #: Pings sent to each bootstrap address before giving up on it.
    join_attempts: int = 3


@dataclass(eq=False, slots=True)
class _Waiter:
    finished: Callable[[Any], bool]
    done: trio.Event = field(default_factory=trio.Event)
    event: Any = None


class RuntimeNode:
    """One node on the real network. Build it with :func:`open_node`."""

    def __init__(
        self,
        identity: Identity,
        *,
        seed: int | None = None,
        config: RuntimeConfig | None = None,
        identity_created: bool = False,
    ) -> None:
        self.identity = identity
        self.identity_created = identity_created
        self.config = config or RuntimeConfig()
        #: Seeded once here; every layer draws from it (``random.Random(None)`` seeds from the OS).
        self.rng = random.Random(seed)
        #: What the runtime counted: traffic by path, and inputs dropped by kind
        #: (``malformed``, ``oversized``, ``unknown_type``, ``bad_version``, ``bad_hello``, ...).
        self.counters: Counter[str] = Counter()
        #: Results of the join: bootstrap address -> RTT in seconds, or None when it did not answer.
        self.bootstrap_rtts: dict[HostPort, float | None] = {}
        self._joined = trio.Event()
        self._core: Stack | None = None
        self._transport: Transport | None = None
        self._address: HostPort | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._waiters: set[_Waiter] = set()
        self._subscribers: list[trio.MemorySendChannel[Any]] = []

    # -- identity and state ------------------------------------------------------------------
    @property
    def node_id(self) -> int:
        return self.identity.node_id

    @property
    def node_id_hex(self) -> str:
        return f"{self.identity.node_id:040x}"

    @property
    def address(self) -> HostPort:
        """The ``(host, port)`` this node listens on, for UDP and TCP alike."""
        if self._address is None:
            raise NodeNotRunning("the node has not started; use it inside `async with open_node(...)`")
        return self._address

    @property
    def core(self) -> Stack:
        if self._core is None:
            raise NodeNotRunning("the node is not running; use it inside `async with open_node(...)`")
        return self._core

    @property
    def peers(self) -> dict[HostPort, int | None]:
        """Peers heard from so far: address -> node id."""
        return dict(self.core.layer(PingProtocol).peers)

    def core_counters(self) -> dict[str, int]:
        """Inputs the core dropped, by layer and kind (``PingProtocol.unsolicited_pong``, ...)."""
        counts = {f"Stack.{kind}": n for kind, n in self.core.dropped.items()}
        for layer in self.core.layers:
            counts.update({f"{type(layer).__name__}.{kind}": n for kind, n in layer.dropped.items()})
        return counts

    # -- lifetime ----------------------------------------------------------------------------
    async def run(
        self,
        listen: HostPort,
        layers: LayersFactory = default_layers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, build the core and serve until cancelled; ``started`` once traffic flows."""
        if self._transport is not None:
            raise RuntimeError("a RuntimeNode runs once; make a new one")
        transport = await Transport.bind(listen, self._deliver, self.counters, self.config.transport)
        try:
            context = CoreContext(self.identity, transport.address, self.rng, trio.current_time())
            self._core = build_core(context, layers)
        except BaseException:
            transport.close()
            raise
        self._transport = transport
        self._address = transport.address
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.run)
                await nursery.start(self._run_timer)
                self._after_input()  # layers may have queued work while being built
                task_status.started()
        finally:
            self._transport = None
            self._core = None
            for waiter in self._waiters:  # nobody can answer them now
                waiter.done.set()

    async def _run_timer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The node's one timer: a cancel scope whose deadline tracks the core's next deadline."""
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._core_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            deadline = self.core.next_deadline()
            if deadline is not None and deadline <= trio.current_time():
                self.core.handle_timer(max(deadline, trio.current_time()))
                self._after_input()

    def _core_deadline(self) -> float:
        deadline = self.core.next_deadline()
        return math.inf if deadline is None else deadline

    # -- the driver step: after every input ------------------------------------------------
    def _deliver(self, src: HostPort, data: bytes, limit_bytes: int) -> None:
        msg = wire.decode(data, limit_bytes)
        if isinstance(msg, wire.DecodeError):
            self.counters[msg.kind] += 1
            log.debug(
                "dropped %d bytes from %s: %s (%s)", len(data), format_host_port(src), msg.kind, msg.detail
            )
            return
        self.core.receive(src, msg, trio.current_time())
        self._after_input()

    def _after_input(self) -> None:
        core = self.core
        while (event := core.next_event()) is not None:
            self._dispatch(event)
        for dst, msg in core.messages_to_send():
            self._send(dst, msg)
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._core_deadline()

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, PeerSeen):
            log.info("peer %040x seen at %s", event.node_id, format_host_port(event.address))
        for waiter in list(self._waiters):
            if not waiter.done.is_set() and waiter.finished(event):
                waiter.event = event
                waiter.done.set()
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def _send(self, dst: Any, msg: Any) -> None:
        if not (
            isinstance(dst, tuple) and len(dst) == 2 and isinstance(dst[0], str) and isinstance(dst[1], int)
        ):
            self.counters["bad_destination"] += 1
            log.error("core sent %s to %r, which is not a (host, port) address", type(msg).__name__, dst)
            return
        try:
            data = wire.encode(msg, self.config.transport.stream_limit_bytes)
        except wire.WireError as exc:
            self.counters["encode_error"] += 1
            log.error("cannot send %s to %s: %s", type(msg).__name__, format_host_port(dst), exc)
            return
        self._running_transport().send(dst, data)

    def _running_transport(self) -> Transport:
        if self._transport is None:
            raise NodeNotRunning("the node is not running; use it inside `async with open_node(...)`")
        return self._transport

    # -- the facade --------------------------------------------------------------------------
    def command(self, start: Callable[[float], T]) -> T:
        """Run a core API call ``start(now)`` that only queues work, then flush its output."""
        result = start(self._now())
        self._after_input()
        return result

    async def request(self, start: Callable[[float], T], finished: Callable[[T, Any], bool]) -> Any:
        """Run ``start(now)`` on the core and wait for the first event ``finished(result, event)`` accepts.

        ``start`` returns what identifies the work (a nonce, a query); the waiter is in place
        before the core's output is drained, so an event emitted at once is not missed. Bound
        the wait with a cancel scope.
        """
        token = start(self._now())
        waiter = _Waiter(lambda event: finished(token, event))
        self._waiters.add(waiter)
        try:
            self._after_input()
            await waiter.done.wait()
            if waiter.event is None:
                raise NodeNotRunning("the node stopped before the answer came")
            return waiter.event
        finally:
            self._waiters.discard(waiter)

    def _now(self) -> float:
        """The core's clock, for a call made through the facade (raises when not running)."""
        self._running_transport()
        return trio.current_time()

    async def ping_pong(
        self, address: HostPort, payload: bytes = b"", timeout_s: float | None = None
    ) -> PongReceived:
        """Ping ``address`` and return the core's :class:`PongReceived` (RTT, peer id, smoothed RTT).

        Raises :class:`PingTimeout` when the ping protocol declares the ping lost (after the
        peer's retransmission timeout) or ``timeout_s`` passes, whichever is first, and
        :class:`ValueError` when the payload cannot fit in one stream frame.
        """
        address = await self.resolve(address)
        self._check_fits(Ping(0, self.node_id, payload))
        layer = self.core.layer(PingProtocol)
        started = trio.current_time()
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
            event = await self.request(
                lambda now: layer.ping(address, now, payload),
                lambda nonce, ev: isinstance(ev, PongReceived | PingTimedOut) and ev.nonce == nonce,
            )
            if isinstance(event, PongReceived):
                return event
        raise PingTimeout(address, trio.current_time() - started)

    async def ping(self, address: HostPort, payload: bytes = b"", timeout_s: float | None = None) -> float:
        """Ping ``address``; the round-trip time in seconds. See :meth:`ping_pong`."""
        return (await self.ping_pong(address, payload, timeout_s)).rtt_s

    async def join(self, addresses: Iterable[HostPort]) -> dict[HostPort, float | None]:
        """Ping each bootstrap address (``join_attempts`` tries each); their RTTs, None if silent."""

        async def join_one(address: HostPort) -> None:
            rtt_s = None
            for _ in range(self.config.join_attempts):
                try:
                    rtt_s = await self.ping(address)
                    break
                except PingTimeout:
                    continue
                except ValueError as exc:
                    log.warning("cannot join via %s: %s", format_host_port(address), exc)
                    break
            if rtt_s is None:
                log.warning("bootstrap %s did not answer", format_host_port(address))
            self.bootstrap_rtts[address] = rtt_s

        try:
            async with trio.open_nursery() as nursery:
                for address in addresses:
                    nursery.start_soon(join_one, address)
        finally:
            self._joined.set()
        return dict(self.bootstrap_rtts)

    async def wait_joined(self) -> dict[HostPort, float | None]:
        """Wait until the join that :func:`open_node` started has heard from (or given up on) each bootstrap."""
        await self._joined.wait()
        return dict(self.bootstrap_rtts)

    @contextmanager
    def subscribe(self, buffer: int | None = None) -> Iterator[trio.MemoryReceiveChannel[Any]]:
        """A channel of every core event from now on (``PeerSeen``, ``PongReceived``, ...)."""
        send, receive = trio.open_memory_channel[Any](self.config.event_buffer if buffer is None else buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()

    async def resolve(self, address: HostPort) -> HostPort:
        """The numeric ``(host, port)`` the core knows a peer by (``localhost`` -> ``127.0.0.1``)."""
        host, port = address
        family = self._running_transport().family
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=family, type=stdlib_socket.SOCK_DGRAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {format_host_port(address)}: {exc}") from None
        if not infos:
            raise ValueError(f"cannot resolve {format_host_port(address)}")
        return (infos[0][4][0], port)

    def path_of(self, msg: Any) -> str:
        """``"udp"`` or ``"tcp"``: how this node would send ``msg``."""
        return path_for(len(wire.encode(msg, self.config.transport.stream_limit_bytes)))

    def _check_fits(self, msg: Any) -> None:
        try:
            wire.encode(msg, self.config.transport.stream_limit_bytes)
        except wire.WireError as exc:
            raise ValueError(
                f"{exc}; raise RuntimeConfig.transport.stream_limit_bytes or send less"
            ) from None


def load_identity(data_dir: str | os.PathLike[str] | None) -> tuple[Identity, bool]:
    """The identity kept in ``data_dir`` (created on first start), or a fresh in-memory one."""
    if data_dir is None:
        return Identity.generate(), True
    return Identity.load_or_create(data_dir)


@asynccontextmanager
async def open_node(
    listen: HostPort = ("127.0.0.1", 0),
    *,
    data_dir: str | os.PathLike[str] | None = None,
    bootstrap: Sequence[HostPort] = (),
    identity: Identity | None = None,
    seed: int | None = None,
    layers: LayersFactory = default_layers,
    config: RuntimeConfig | None = None,
) -> AsyncIterator[RuntimeNode]:
    """Run a node for the duration of the block; it is stopped and its sockets closed on exit.

    ``listen`` port 0 lets the OS choose (``node.address`` tells which). The identity comes
    from ``identity``, else from ``data_dir`` (created there on first start, mode 0600), else
    it is fresh and in memory. With ``bootstrap`` the node pings each address in the
    background (:meth:`RuntimeNode.wait_joined`). ``layers`` builds the core's protocol layers.
    """
    created = False
    if identity is None:
        identity, created = load_identity(data_dir)
    node = RuntimeNode(identity, seed=seed, config=config, identity_created=created)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run, listen, layers)
            nursery.start_soon(node.join, list(bootstrap))
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's block runs inside this nursery; give back its exception (or a failed
        # bind's) as raised, not wrapped in a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
