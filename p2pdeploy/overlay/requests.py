"""Requests in flight: ids, the peer that must answer, deadlines, and the cap.

A protocol that asks a peer something and waits for the answer keeps the same four facts per
request: an id the answer echoes, who must answer it (an address, a node id, or both), when to
stop waiting, and what to do with the answer. :class:`RequestTracker` keeps them for a
:class:`~p2pdeploy.core.Protocol` (its *owner*), and arms and cancels the owner's timer for each
request, named ``(timer, request_id)``, so a layer keeps its timer names and several trackers
share one owner.

Every request ends exactly once, in one of three ways:

- :meth:`RequestTracker.reply`: an answer from the expected peer. An answer with an unknown id,
  or from another peer (a spoofed or a late answer to an id drawn again), ends nothing: it is
  dropped and counted in the owner's ``dropped`` under the layer's name for it
  (``unsolicited_reply``, ``unsolicited_ack``, ...);
- :meth:`RequestTracker.timed_out`, from the owner's ``on_timer``: the deadline passed;
- :meth:`RequestTracker.end`: the owner stops waiting (answered locally, or no longer wanted).

Ids are drawn from the owner's :class:`~p2pdeploy.core.Rng` (``id_bits`` random bits, never 0
and never an id in flight, as a reply that echoes 0 often means "none"), or counted up from 1
when no rng is given. At most ``limit`` requests are in flight: :meth:`RequestTracker.issue`
raises :class:`RequestsFull` beyond it, so a local caller learns that it floods the node; a
layer that issues requests on a peer's behalf asks :attr:`RequestTracker.full` first and drops
(and counts) the work instead, since a peer's input must never raise out of the core.

Not here: retransmission (a layer re-sends and calls :meth:`RequestTracker.rearm`), suspicion
of a silent peer (the failure detector's business), and what an answer means.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pdeploy.core import Address, Protocol, Rng

T = TypeVar("T")

#: Requests a tracker holds in flight unless told otherwise.
DEFAULT_LIMIT = 4096


class RequestsFull(RuntimeError):
    """The tracker holds ``limit`` requests already; wait for answers or timeouts."""


@dataclass(slots=True)
class Request(Generic[T]):
    """One request in flight."""

    request_id: int
    data: T
    #: Who must answer: the address (None: any), and the node id (None: any).
    address: Address | None
    node_id: int | None
    sent_at: float
    deadline: float


class RequestTracker(Generic[T]):
    """The requests one protocol object has in flight; see the module docstring.

    ``timer`` names the owner's timers (``(timer, request_id)``); ``unexpected`` is the key of
    the owner's ``dropped`` counter for answers that end nothing; ``what`` names the requests in
    the :class:`RequestsFull` message. ``counts`` holds ``issued``, ``answered``, ``timed_out``
    and ``ended`` (by the owner) since the tracker was made.
    """

    def __init__(
        self,
        owner: Protocol,
        timer: str,
        *,
        rng: Rng | None = None,
        id_bits: int = 63,
        limit: int = DEFAULT_LIMIT,
        unexpected: str = "unsolicited_reply",
        what: str = "requests",
    ) -> None:
        if limit < 1:
            raise ValueError(f"a request tracker's limit must be >= 1 (got {limit})")
        if not 1 <= id_bits <= 64:
            raise ValueError(f"id_bits must be in [1, 64] (got {id_bits})")
        self.owner = owner
        self.timer = timer
        self.rng = rng
        self.id_bits = id_bits
        self.limit = limit
        self.unexpected = unexpected
        self.what = what
        self.counts: Counter[str] = Counter()
        self._requests: dict[int, Request[T]] = {}
        self._last_id = 0

    # -- issuing ---------------------------------------------------------------------------
    def issue(
        self,
        data: T,
        now: float,
        timeout_s: float,
        *,
        address: Address | None = None,
        node_id: int | None = None,
    ) -> int:
        """Remember a request (the caller sends it, carrying the id) and arm its timeout; the id.

        ``address`` and ``node_id`` name the peer whose answer ends it (None: any peer).
        Raises :class:`RequestsFull` at the limit, ``ValueError`` for ``timeout_s <= 0``."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        if self.full:
            raise RequestsFull(f"{self.limit} {self.what} in flight already (the limit); wait for answers")
        request_id = self._new_id()
        deadline = now + timeout_s
        self._requests[request_id] = Request(request_id, data, address, node_id, now, deadline)
        self.owner.set_timer((self.timer, request_id), deadline)
        self.counts["issued"] += 1
        return request_id

    def _new_id(self) -> int:
        requests = self._requests
        if self.rng is None:
            request_id = self._last_id + 1
            while request_id in requests:
                request_id += 1
            self._last_id = request_id
            return request_id
        request_id = self.rng.getrandbits(self.id_bits)
        while request_id in requests or request_id == 0:
            request_id = self.rng.getrandbits(self.id_bits)
        return request_id

    @property
    def full(self) -> bool:
        """True when :meth:`issue` would raise: ``limit`` requests are in flight."""
        return len(self._requests) >= self.limit

    # -- ending ----------------------------------------------------------------------------
    def reply(self, request_id: int, src: Address, sender: int | None = None) -> Request[T] | None:
        """An answer carrying ``request_id`` came from ``src`` (which says it is ``sender``).

        From the expected peer it ends the request, which is returned; otherwise nothing ends,
        the answer is counted in the owner's ``dropped[unexpected]`` and None is returned."""
        request = self._requests.get(request_id)
        if (
            request is None
            or (request.address is not None and request.address != src)
            or (request.node_id is not None and request.node_id != sender)
        ):
            self.owner.dropped[self.unexpected] += 1
            return None
        self.counts["answered"] += 1
        return self._end(request_id)

    def owns(self, timer_name: Hashable) -> bool:
        """True when ``timer_name`` is one of this tracker's timers."""
        return isinstance(timer_name, tuple) and len(timer_name) == 2 and timer_name[0] == self.timer

    def timed_out(self, timer_name: Hashable) -> Request[T] | None:
        """From the owner's ``on_timer``: the request whose timeout ``timer_name`` is, now ended;
        None when the timer is not this tracker's or its request has ended already."""
        if not self.owns(timer_name):
            return None
        assert isinstance(timer_name, tuple)
        request = self._requests.pop(timer_name[1], None)
        if request is not None:
            self.counts["timed_out"] += 1
        return request

    def end(self, request_id: int) -> Request[T] | None:
        """The owner stops waiting for ``request_id`` (answered otherwise, or no longer wanted);
        the request, or None when it had ended already."""
        if request_id not in self._requests:
            return None
        self.counts["ended"] += 1
        return self._end(request_id)

    def _end(self, request_id: int) -> Request[T]:
        self.owner.cancel_timer((self.timer, request_id))
        return self._requests.pop(request_id)

    # -- the rest --------------------------------------------------------------------------
    def rearm(self, request_id: int, deadline: float) -> None:
        """Move the timeout of a request in flight to ``deadline`` (after a retransmission)."""
        request = self._requests[request_id]
        request.deadline = deadline
        self.owner.set_timer((self.timer, request_id), deadline)

    def get(self, request_id: int) -> Request[T] | None:
        return self._requests.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request[T]]:
        return iter(list(self._requests.values()))


__all__ = ["DEFAULT_LIMIT", "Request", "RequestTracker", "RequestsFull"]
