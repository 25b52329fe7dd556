"""Bounds on what a listening socket lets strangers hold: connections, time and buffered bytes.

Every accept loop of a node (the TCP transport, the state API, the control socket) serves through
:func:`serve_bounded`, which gives each listener:

- a cap on connections, in all and per source address. A connection over a cap takes the place
  of the quietest connection under that cap (the one that has gone longest without completing a
  frame or a request, and is not being answered), so connections held open by someone who sends
  nothing cannot lock peers out; when every connection under the cap is busy, the new one is
  refused. Both are counted (``<name>_evicted``, ``<name>_refused``) and change nothing else.
- deadlines: the first request (or hello) within ``header_timeout_s`` of the accept, no silence
  longer than ``idle_timeout_s``, and a frame or body, once begun, complete within
  ``message_timeout_s``. The handler reads through :meth:`Connection.receive_some`, which applies them.
- a bound on bytes buffered for partial frames, per connection and over the listener: the length
  a frame announces is reserved (:meth:`Connection.reserve`) before its bytes are read, so a frame
  larger than a connection may buffer is refused at its length prefix; when the listener's total
  is short, the partial frame begun longest ago is dropped with its connection to make room.
- an accept loop that survives running out of descriptors: EMFILE/ENFILE back off (up to a
  second) instead of spinning, and are logged through :class:`RefusalLog`.

:class:`RefusalLog` is the one rate limiter for lines about refused input: one line per reason
per interval, the next saying how many were suppressed meanwhile. A flood of refusals costs a few
log lines, not one each.

This module decides nothing about protocols; it bounds resources for the drivers that do.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import trio

from p2pdeploy.core import require_positive
from p2pdeploy.wire import STREAM_LIMIT_BYTES

log = logging.getLogger(__name__)

#: accept() errors that mean "out of descriptors or memory for now", not a broken listener.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_FIRST_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener lets its clients hold (see the module docstring for how each applies);
    the defaults are the TCP transport's.

    ``max_connections`` are served at once, ``max_connections_per_source`` of them from one
    address (on loopback every client shares one); a new connection over either cap replaces the
    quietest. The first frame or request head must arrive within ``header_timeout_s`` of the
    accept; a connection silent for ``idle_timeout_s`` is closed; a frame or body, once begun, must
    be complete within ``message_timeout_s``. One connection may buffer
    ``max_buffered_bytes_per_connection`` for its partial frame or body (the transport's default
    is one frame of ``wire.STREAM_LIMIT_BYTES``), all of them ``max_buffered_bytes_total``.
    """

    max_connections: int = 256
    max_connections_per_source: int = 128
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    message_timeout_s: float = 60.0
    max_buffered_bytes_per_connection: int = STREAM_LIMIT_BYTES
    max_buffered_bytes_total: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        require_positive(self, "ListenerLimits.", *(f.name for f in fields(self)))


class RefusalLog:
    """Rate-limited lines about refused input: at most one per reason per ``interval_s``.

    A line that follows suppressed ones of its reason ends with how many there were, so the log
    still says how much was refused. Reasons are a small fixed vocabulary chosen by the call
    sites (never text a client chose); past ``max_reasons`` the oldest are forgotten.
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_reasons: int = 256) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.max_reasons = max_reasons
        #: reason -> [time of the last line, lines suppressed since]
        self._reasons: dict[str, list[float]] = {}

    def allow(self, reason: str) -> int | None:
        """None when a line for ``reason`` must stay quiet now; otherwise how many were suppressed
        since the last one (the caller writes its line, mentioning them when there were any)."""
        now = self.clock()
        state = self._reasons.get(reason)
        if state is not None and now - state[0] < self.interval_s:
            state[1] += 1
            return None
        suppressed = int(state[1]) if state is not None else 0
        self._reasons.pop(reason, None)
        if len(self._reasons) >= self.max_reasons:
            del self._reasons[next(iter(self._reasons))]
        self._reasons[reason] = [now, 0]
        return suppressed

    def log(self, level: int, reason: str, message: str, *args: Any, **kwargs: Any) -> None:
        suppressed = self.allow(reason)
        if suppressed is None or not self.logger.isEnabledFor(level):
            return
        if suppressed:
            message += " (and %d more like it suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, message, *args, **kwargs)

    def debug(self, reason: str, message: str, *args: Any) -> None:
        self.log(logging.DEBUG, reason, message, *args)

    def warning(self, reason: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, reason, message, *args)


@dataclass(eq=False, slots=True)
class Connection:
    """One admitted connection: its source, its deadlines and what it has buffered."""

    guard: ConnectionGuard
    source: str
    accepted_at: float
    #: When it last completed a frame or request (or was accepted): eviction takes the oldest.
    quiet_since: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Being answered: not evicted while this holds.
    busy: bool = False
    #: True once the first frame or request head is in (the header deadline no longer applies).
    introduced: bool = False
    #: The deadline of the frame or body being received (inf between messages).
    message_deadline: float = math.inf
    buffered_bytes: int = 0
    evicted: bool = False

    async def receive_some(self, stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | None:
        """The next bytes from ``stream`` (b"" at its end), or None when a deadline passed (counted
        as ``<name>_timeouts``): the caller closes the connection."""
        limits = self.guard.limits
        deadline = min(trio.current_time() + limits.idle_timeout_s, self.message_deadline)
        if not self.introduced:
            deadline = min(deadline, self.accepted_at + limits.header_timeout_s)
        with trio.move_on_at(deadline):
            return await stream.receive_some(max_bytes)
        self.guard.count("timeouts")
        return None

    def begin_message(self) -> None:
        """A frame or body has begun: it must be complete within ``message_timeout_s``."""
        if self.message_deadline == math.inf:
            self.message_deadline = trio.current_time() + self.guard.limits.message_timeout_s

    def completed_message(self) -> None:
        """A frame or request is complete: the connection counts as active now."""
        self.introduced = True
        self.message_deadline = math.inf
        self.quiet_since = trio.current_time()

    def reserve(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more buffered bytes, or False (counted as ``<name>_buffer_refused``):
        the caller refuses the frame or body that announced them."""
        return self.guard._reserve(self, nbytes)

    def release_buffer(self) -> None:
        self.guard._release_buffer(self)


class ConnectionGuard:
    """The connections one listener serves, against its :class:`ListenerLimits`."""

    def __init__(self, name: str, limits: ListenerLimits, counters: Counter[str]) -> None:
        self.name = name
        self.limits = limits
        self.counters = counters
        self.connections: set[Connection] = set()
        self._by_source: dict[str, set[Connection]] = {}
        self.buffered_bytes = 0

    def count(self, what: str, n: int = 1) -> None:
        self.counters[f"{self.name}_{what}"] += n

    def admit(self, source: str, now: float) -> Connection | None:
        """A new connection from ``source``, after evicting the quietest one over a cap it hits;
        None when it must be refused (every connection under that cap is busy)."""
        same_source = self._by_source.get(source, set())
        if len(same_source) >= self.limits.max_connections_per_source:
            crowd = same_source
        elif len(self.connections) >= self.limits.max_connections:
            crowd = self.connections
        else:
            crowd = set()
        if crowd:
            idle = [c for c in crowd if not c.busy]
            if not idle:
                self.count("refused")
                return None
            self._evict(min(idle, key=lambda c: c.quiet_since))
        connection = Connection(self, source, accepted_at=now, quiet_since=now)
        self.connections.add(connection)
        self._by_source.setdefault(source, set()).add(connection)
        self.count("accepted")
        return connection

    def release(self, connection: Connection) -> None:
        self._release_buffer(connection)
        if connection in self.connections:
            self.connections.remove(connection)
            same_source = self._by_source[connection.source]
            same_source.discard(connection)
            if not same_source:
                del self._by_source[connection.source]

    def _evict(self, connection: Connection) -> None:
        connection.evicted = True
        connection.scope.cancel()
        self.release(connection)
        self.count("evicted")

    def _reserve(self, connection: Connection, nbytes: int) -> bool:
        if connection.buffered_bytes + nbytes > self.limits.max_buffered_bytes_per_connection:
            self.count("buffer_refused")
            return False
        while self.buffered_bytes + nbytes > self.limits.max_buffered_bytes_total:
            # The partial frame begun longest ago yields: on a healthy link a frame takes moments,
            # so the oldest is the likeliest to be held open on purpose.
            holders = [c for c in self.connections if c.buffered_bytes and c is not connection and not c.busy]
            if not holders:
                self.count("buffer_refused")
                return False
            self._evict(min(holders, key=lambda c: c.message_deadline))
        connection.buffered_bytes += nbytes
        self.buffered_bytes += nbytes
        return True

    def _release_buffer(self, connection: Connection) -> None:
        self.buffered_bytes -= connection.buffered_bytes
        connection.buffered_bytes = 0


Handler = Callable[[trio.SocketStream, Connection], Awaitable[None]]


def _source_of(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:  # reset before we looked
        return "?"
    return peer[0] if isinstance(peer, tuple) else "local"


async def serve_bounded(
    listener: trio.SocketListener,
    handler: Handler,
    guard: ConnectionGuard,
    refusals: RefusalLog,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` until cancelled and serve each admitted connection with
    ``handler(stream, connection)`` in a nursery of its own; the listener is closed on the way out.

    The handler's I/O errors (a client that hung up, reset, ...) end its connection only, and so
    does any other exception (counted as ``<name>_failed`` and logged); the stream is closed,
    and the connection's slot freed, however the handler ends.
    """
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        backoff_s = ACCEPT_BACKOFF_FIRST_S
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                guard.count("accept_errors")
                refusals.warning(f"{guard.name} accept", "%s: cannot accept a connection (%s); retrying in %.2f s",
                                 guard.name, os.strerror(exc.errno or 0), backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, ACCEPT_BACKOFF_MAX_S)
                continue
            backoff_s = ACCEPT_BACKOFF_FIRST_S
            connection = guard.admit(_source_of(stream), trio.current_time())
            if connection is None:
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_serve_one, stream, connection, handler, refusals)


async def _serve_one(stream: trio.SocketStream, connection: Connection, handler: Handler,
                     refusals: RefusalLog) -> None:
    guard = connection.guard
    try:
        with connection.scope:
            await handler(stream, connection)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        guard.count("broken")
        refusals.debug(f"{guard.name} broken", "%s: connection from %s failed: %r", guard.name, connection.source, exc)
    except Exception:  # a defect the client's input reached: it ends this connection, never the node
        guard.count("failed")
        refusals.log(logging.ERROR, f"{guard.name} failed", "%s: serving a connection from %s failed",
                     guard.name, connection.source, exc_info=True)
    finally:
        guard.release(connection)
        await trio.aclose_forcefully(stream)
