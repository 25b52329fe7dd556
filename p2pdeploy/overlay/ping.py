"""Ping/pong with round-trip-time estimation: the smallest protocol that proves a driver.

Each node answers ``Ping`` with ``Pong`` (echoing the nonce and payload) and keeps, per peer,
a smoothed RTT and its variation as TCP does (RFC 6298: SRTT, RTTVAR, RTO). A ping that gets
no answer within the peer's RTO is reported as timed out. With ``interval_s`` set the node
pings a random known peer on that period, which is the simulator's ping workload.

It is not a failure detector: the overlay's liveness checks build on these estimates.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Protocol, Rng
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.wire import NodeId, message

INITIAL_RTO_S = 1.0
#: RFC 6298's floor: a shorter RTO declares pings lost that a busy host answers late.
MIN_RTO_S = 1.0
MAX_RTO_S = 60.0
#: Upper bound on pings waiting for an answer, so a flood of API calls cannot grow memory.
MAX_OUTSTANDING = 4096


@dataclass(frozen=True, slots=True)
class _Echo:
    """What a ping and its pong both carry (a pong echoes the ping's nonce and payload)."""

    nonce: int
    sender: NodeId
    payload: bytes = b""


@message(1)
class Ping(_Echo):
    pass


@message(2)
class Pong(_Echo):
    pass


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A peer was heard from for the first time."""

    address: Address
    node_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    address: Address
    node_id: int
    nonce: int
    rtt_s: float
    srtt_s: float
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class PingTimedOut:
    address: Address
    nonce: int


@dataclass(slots=True)
class RttEstimate:
    """RFC 6298 estimator for one peer."""

    srtt_s: float | None = None
    rttvar_s: float = 0.0
    rto_s: float = INITIAL_RTO_S
    samples: int = 0

    def add(self, rtt_s: float) -> None:
        if self.srtt_s is None:
            self.srtt_s = rtt_s
            self.rttvar_s = rtt_s / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt_s)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt_s
        self.rto_s = min(MAX_RTO_S, max(MIN_RTO_S, self.srtt_s + 4 * self.rttvar_s))
        self.samples += 1


@dataclass(slots=True)
class PingStats:
    sent: int = 0
    answered: int = 0
    timed_out: int = 0
    rtt_samples_s: list[float] = field(default_factory=list)


class PingProtocol(Protocol):
    handles = (Ping, Pong)

    def __init__(
        self,
        node_id: int,
        rng: Rng,
        *,
        interval_s: float | None = None,
        peers: Sequence[Address] = (),
        own_address: Address | None = None,
        keep_samples: bool = False,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self.rng = rng
        self.interval_s = interval_s
        self.own_address = own_address
        self.peers: dict[Address, int | None] = {}
        self.pool: Sequence[Address] = peers
        self.rtt: dict[Address, RttEstimate] = {}
        self.stats = PingStats()
        self.keep_samples = keep_samples
        #: Pings waiting for their pong: the nonce is the request id, the value unused.
        self._outstanding: RequestTracker[None] = RequestTracker(
            self, "timeout", rng=rng, limit=MAX_OUTSTANDING, unexpected="unsolicited_pong", what="pings"
        )
        self._started = False

    def start(self, now: float) -> None:
        """Begin the periodic workload (if ``interval_s`` is set)."""
        if self.interval_s is not None and not self._started:
            self._started = True
            self.set_timer("round", now + self.rng.uniform(0, self.interval_s))

    # -- API -------------------------------------------------------------------------------
    def ping(self, address: Address, now: float, payload: bytes = b"", timeout_s: float | None = None) -> int:
        """Queue a ping to ``address``; returns its nonce (matched by the resulting event).

        It is declared lost (:class:`PingTimedOut`) after ``timeout_s`` when given, else after
        the peer's retransmission timeout (RTO, at least :data:`MIN_RTO_S`). Raises
        :class:`~p2pdeploy.overlay.requests.RequestsFull` (a ``RuntimeError``) while
        :data:`MAX_OUTSTANDING` pings wait for answers."""
        if timeout_s is None:
            timeout_s = self.rtt[address].rto_s if address in self.rtt else INITIAL_RTO_S
        nonce = self._outstanding.issue(None, now, timeout_s, address=address)  # RequestsFull at the cap
        self.send(address, Ping(nonce, self.node_id, payload))
        self.stats.sent += 1
        return nonce

    def estimate(self, address: Address) -> RttEstimate | None:
        return self.rtt.get(address)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        if type(msg) is Ping:
            self._heard(src, msg.sender)
            self.send(src, Pong(msg.nonce, self.node_id, msg.payload))
        elif type(msg) is Pong:
            pending = self._outstanding.reply(msg.nonce, src)
            if pending is None:
                return
            self._heard(src, msg.sender)
            rtt_s = max(0.0, now - pending.sent_at)
            estimate = self.rtt.get(src)
            if estimate is None:
                estimate = self.rtt[src] = RttEstimate()
            estimate.add(rtt_s)
            self.stats.answered += 1
            if self.keep_samples:
                self.stats.rtt_samples_s.append(rtt_s)
            self.emit(PongReceived(src, msg.sender, msg.nonce, rtt_s, estimate.srtt_s, len(msg.payload)))
        else:
            self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "round":
            target = self._pick_peer()
            if target is not None and not self._outstanding.full:  # full: skip a round, never raise
                self.ping(target, now)
            assert self.interval_s is not None
            self.set_timer("round", now + self.interval_s)
        elif self._outstanding.owns(name):
            pending = self._outstanding.timed_out(name)
            if pending is not None:
                self.stats.timed_out += 1
                estimate = self.rtt.get(pending.address)
                if estimate is not None:  # back off as TCP does after a loss
                    estimate.rto_s = min(MAX_RTO_S, estimate.rto_s * 2)
                self.emit(PingTimedOut(pending.address, pending.request_id))

    def _heard(self, address: Address, node_id: int) -> None:
        if address not in self.peers:
            self.peers[address] = node_id
            self.emit(PeerSeen(address, node_id))

    def _pick_peer(self) -> Address | None:
        if self.pool:
            for _ in range(4):
                target = self.pool[self.rng.randrange(len(self.pool))]
                if target != self.own_address:
                    return target
            return None
        candidates = [a for a in self.peers if a != self.own_address]
        return self.rng.choice(candidates) if candidates else None
