"""The event heap, the virtual clock, named random streams and the event-trace hash.

After SimPy's ``Environment``: one heap of ``(time, priority, seq, callback, args)`` entries,
so events at the same time run in priority order and then in the order they were scheduled;
``peek()``, ``step()`` and ``run(until=)`` work as in SimPy. Unlike SimPy there are no
generator processes: an event is a plain callback, and the protocol cores it drives are
state machines (see :mod:`p2pdeploy.sim.host`).

After FoundationDB's simulation: one seed is split into named streams
(``streams.get("network")``, ``streams.get("node", 7)``), each derived from the seed and its
name alone, so adding a stream or a node does not shift the draws of any other.

Reproducibility is checked, not assumed: every processed event updates a SHA-256 over a
compact description of it (:class:`TraceHash`: virtual time, callback name, and the
arguments, ints, floats and bytes by value, anything else by its type name, e.g. the class of
a message). When the network carries encoded messages (its default), a delivery's arguments
are the destination, the source and the message's bytes, so the hash covers every message's
content, its endpoints and its delivery time. Two runs with the same seed give the same
:attr:`Engine.trace_hash`. Hashing can be turned off for speed (``Engine(trace=False)``).

This module reads no wall clock and draws no global randomness.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
import sys
from array import array
from collections.abc import Callable
from typing import Any

#: Priorities of same-time events, lowest first (as in SimPy).
URGENT = 0
NORMAL = 1

#: Events are hashed in batches of this many. The digest depends on it (changing it changes
#: every trace hash), but not on when or how often the digest is read.
_TRACE_BATCH = 4096
_BIG_ENDIAN = sys.byteorder == "big"


class EmptySchedule(Exception):
    """``step()`` was called with no event scheduled."""


class Engine:
    """A virtual clock and a heap of timed callbacks.

    ``schedule(at, callback, *args)`` runs ``callback(*args)`` when the clock reaches
    ``at``. Events run in ``(time, priority, insertion order)`` order. Scheduling in the past
    is local misuse and raises :class:`ValueError`.
    """

    __slots__ = ("now", "events", "_heap", "_seq", "_trace")

    def __init__(self, *, trace: bool = True, start: float = 0.0) -> None:
        self.now: float = start
        #: Events processed so far.
        self.events = 0
        self._heap: list[tuple[float, int, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self._trace: TraceHash | None = TraceHash() if trace else None

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, at: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at virtual time ``at`` (absolute, seconds)."""
        if at < self.now:
            raise ValueError(f"cannot schedule at {at!r}, before the current time {self.now!r}")
        self._seq += 1
        heapq.heappush(self._heap, (at, NORMAL, self._seq, callback, args))

    def schedule_with_priority(self, at: float, priority: int, callback: Callable[..., Any], *args: Any) -> None:
        """As :meth:`schedule`, ahead of (``URGENT``) or behind same-time events of other priorities."""
        if at < self.now:
            raise ValueError(f"cannot schedule at {at!r}, before the current time {self.now!r}")
        self._seq += 1
        heapq.heappush(self._heap, (at, priority, self._seq, callback, args))

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` ``delay`` seconds from now."""
        if delay < 0:
            raise ValueError(f"delay must be >= 0 (got {delay!r})")
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, NORMAL, self._seq, callback, args))

    # -- running ---------------------------------------------------------------------------
    def peek(self) -> float:
        """The time of the next event, or ``math.inf`` when none is scheduled."""
        return self._heap[0][0] if self._heap else math.inf

    def pending(self) -> int:
        """How many events are scheduled."""
        return len(self._heap)

    def step(self) -> None:
        """Process the next event; raise :class:`EmptySchedule` when there is none."""
        if not self._heap:
            raise EmptySchedule("no event is scheduled")
        at, _, _, callback, args = heapq.heappop(self._heap)
        self.now = at
        self.events += 1
        if self._trace is not None:
            self._trace.record(at, callback, args)
        callback(*args)

    def run(self, until: float | None = None) -> int:
        """Process events before ``until`` (all of them when ``None``); return how many ran.

        As in SimPy, events scheduled exactly at ``until`` stay on the heap and the clock
        ends at ``until``, so ``run(until=a); run(until=b)`` processes the same events in
        the same order as ``run(until=b)``.
        """
        limit = math.inf if until is None else until
        if limit < self.now:
            raise ValueError(f"cannot run until {until!r}, before the current time {self.now!r}")
        heap = self._heap
        pop = heapq.heappop
        processed = 0
        try:
            if self._trace is None:
                while heap:
                    entry = pop(heap)
                    at = entry[0]
                    if at >= limit:
                        heapq.heappush(heap, entry)  # once per run: cheaper than peeking every event
                        break
                    self.now = at
                    processed += 1
                    entry[3](*entry[4])
            else:
                record = self._trace.record
                while heap:
                    entry = pop(heap)
                    at = entry[0]
                    if at >= limit:
                        heapq.heappush(heap, entry)
                        break
                    self.now = at
                    processed += 1
                    record(at, entry[3], entry[4])
                    entry[3](*entry[4])
        finally:
            self.events += processed
        if until is not None:
            self.now = until
        return processed

    # -- trace -----------------------------------------------------------------------------
    @property
    def tracing(self) -> bool:
        return self._trace is not None

    @property
    def trace_hash(self) -> str:
        """SHA-256 (hex) over every processed event so far; empty string when tracing is off."""
        return self._trace.hexdigest() if self._trace is not None else ""


class TraceHash:
    """SHA-256 over a compact description of each processed event.

    An event is described by its time, its callback's name and its arguments: ints, floats and
    bytes by value, strings, bools and ``None`` by text, anything else by its type name (a
    message object by its class, never by ``repr``, which could hold a memory address; an
    encoded message by its bytes). Descriptions are buffered in four streams (floats, 64-bit
    ints, bytes with their lengths in the int stream, and text with a tag per argument saying
    which stream holds it) and hashed in batches of ``_TRACE_BATCH`` events, several times
    cheaper per event than formatting a line of text. Reading the digest does not end a batch,
    so it may be read at any time without changing what a run hashes to.
    """

    __slots__ = ("_floats", "_ints", "_blobs", "_texts", "_digest", "_pending")

    def __init__(self) -> None:
        self._floats = array("d")
        self._ints = array("q")
        self._blobs = bytearray()
        self._texts: list[str] = []
        self._digest = hashlib.sha256()
        self._pending = 0

    def record(self, at: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        floats = self._floats
        texts = self._texts
        floats.append(at)
        texts.append(getattr(callback, "__name__", None) or type(callback).__name__)
        for arg in args:
            kind = type(arg)
            if kind is int:
                try:
                    self._ints.append(arg)
                    texts.append("i")
                except OverflowError:
                    texts.append(f"I{arg}")
            elif kind is float:
                floats.append(arg)
                texts.append("f")
            elif kind is bytes:
                self._ints.append(len(arg))
                self._blobs += arg
                texts.append("b")
            elif kind is str or kind is bool or arg is None:
                texts.append(f"s{arg}")
            else:
                texts.append(kind.__name__)
        self._pending += 1
        if self._pending >= _TRACE_BATCH:
            self._flush()

    def hexdigest(self) -> str:
        # The pending part of a batch is hashed into a copy: reading the digest mid-run must not
        # move the batch boundaries, or a run that is read along the way would hash differently.
        digest = self._digest.copy()
        self._absorb(digest)
        return digest.hexdigest()

    def _flush(self) -> None:
        self._absorb(self._digest)
        self._floats = array("d")
        self._ints = array("q")
        self._blobs = bytearray()
        self._texts = []
        self._pending = 0

    def _absorb(self, digest: Any) -> None:
        """Hash the buffered descriptions into ``digest`` (the buffers are left as they are)."""
        if not self._pending:
            return
        floats = self._floats
        ints = self._ints
        if _BIG_ENDIAN:  # hash the same bytes on every machine
            floats = array("d", floats)
            ints = array("q", ints)
            floats.byteswap()
            ints.byteswap()
        digest.update(len(floats).to_bytes(8, "little"))
        digest.update(floats.tobytes())
        digest.update(len(ints).to_bytes(8, "little"))
        digest.update(ints.tobytes())
        if self._blobs:  # absent when no event carried bytes: such traces hash as they always did
            digest.update(len(self._blobs).to_bytes(8, "little"))
            digest.update(self._blobs)
        digest.update("\x00".join(self._texts).encode())


class Streams:
    """Named, independent ``random.Random`` streams derived from one seed.

    ``get(name, *index)`` returns the stream for ``name`` (and an optional index, such as a
    node address), seeded from SHA-256 of the JSON ``[seed, name, *index]``. Asking twice
    returns the same object; asking for a new name never shifts existing streams. ``fresh``
    builds one without remembering it (for a core that is discarded at a crash).
    """

    __slots__ = ("seed", "_streams")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[tuple[Any, ...], random.Random] = {}

    def get(self, name: str, *index: int) -> random.Random:
        key = (name, *index)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self.fresh(name, *index)
        return stream

    def fresh(self, name: str, *index: int) -> random.Random:
        """A new stream for ``name`` (same draws as ``get`` would give), not remembered."""
        return random.Random(int.from_bytes(self._digest((name, *index))[:16], "big"))

    def bytes(self, name: str, *index: int, size: int = 32) -> bytes:
        """``size`` deterministic bytes for ``name`` (e.g. the seed of a node's key pair)."""
        out = b""
        counter = 0
        while len(out) < size:
            out += self._digest((name, *index, "bytes", counter))
            counter += 1
        return out[:size]

    def _digest(self, key: tuple[Any, ...]) -> bytes:
        # JSON keeps the parts apart: ("a:b", 1) and ("a", "b", 1) are different streams.
        return hashlib.sha256(json.dumps([self.seed, *key]).encode()).digest()
