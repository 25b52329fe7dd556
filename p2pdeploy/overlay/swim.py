"""Failure detection: SWIM's randomized probing with Lifeguard's suspicion and local health.

One :class:`FailureDetector` per node watches the peers that node's layers care about
(membership is not global: ``watch`` and ``unwatch`` say whom). Several layers may watch the
same peer: each names itself as a *holder* (``by="overlay"``, ``by="deployment"``...), and a
peer stays watched while at least one holder keeps it, so one layer letting go of a peer never
blinds another. It follows SWIM (Das, Gupta and
Motivala, DSN 2002) and the refinements of Lifeguard (Dadgar, Phillips and Currey, 2018) as
hashicorp/memberlist implements them:

- **Probing.** Every protocol period the node probes the next watched peer, in a round robin
  reshuffled at each pass (SWIM §4.3). No ack within the probe timeout: it asks up to
  ``indirect_probes`` other watched peers to probe the target (ping-req). Each of them answers
  with the target's ack, or with a *nack* when the target stays silent (Lifeguard), so the asker
  can tell its own slowness (missing nacks) from the target's (nacks but no ack). No ack by the
  end of the period: the target is *suspected*.
- **Suspicion** (SWIM §4.2, Lifeguard's dynamic suspicion). A suspect is not dead yet. Its
  timeout starts at ``suspicion_min_mult × suspicion_max_mult`` periods and shrinks towards
  ``suspicion_min_mult`` periods as independent confirmations (other nodes' suspicions, carried by
  gossip) arrive: ``max − (max − min) · log(n + 1) / log(K + 1)`` after ``n`` of ``K``. When it
  expires the peer is declared *dead*, and the verdict is gossiped so other watchers accept it.
- **Incarnations.** Each node owns an incarnation number that only it raises. A node that hears
  it is suspected or dead refutes by raising its incarnation and gossiping ``alive``; an alive
  rumor with a higher incarnation overrides any suspicion or verdict of a lower one, and every
  message a node sends carries its incarnation, so talking to it directly is a refutation too.
- **Dissemination.** Rumors (alive, suspect, dead) are piggybacked on probes, acks, ping-reqs and
  nacks, each at most ``gossip_transmissions`` times, the least sent first. A rumor about the
  destination itself always goes first, and the suspecting node tells the suspect directly, so a
  live suspect refutes within a round trip.
- **Local health awareness** (Lifeguard LHA). A score in ``0 .. lha_max − 1`` grows with each
  nack a failed probe should have brought but did not, with each refutation this node had to
  make and with each timer that fired late (the node did not run when it should have); it shrinks
  with each successful probe. The probe timeout and the protocol period are multiplied by
  ``score + 1``, so a slow node slows its own verdicts instead of accusing healthy peers.

Additions of this detector, because watching is partial (a suspect's watchers need not talk to
each other often, and a watcher reaches a given peer in its round robin only once a pass):

- a suspicion adopted from gossip gets this node's next probe, so its own failure confirms it
  quickly (or its ack refutes it);
- every suspect gets a direct probe each protocol period (unscaled by local health: it can only
  clear a suspicion), carrying the suspicion, so a live suspect's refutation reaches every
  watcher that suspects it within a period, without waiting for gossip;
- the peers a suspect rumor came from watch the suspect too: this node's own confirmation and its
  verdict go to them directly, and a watcher still suspecting a peer held dead is handed the
  verdict;
- a timer that fires late (this node did not run when it should have: a pause, an overload) is no
  ground for an accusation: a probe period that ended late suspects no one and raises the health
  score; a suspicion that expired late gets one more period for the refutation to arrive;
- what a layer hears from a peer (:meth:`FailureDetector.heard`) counts as evidence of life that
  clears a suspicion this node raised itself (a suspicion adopted from gossip, or a verdict, needs
  the peer's refutation: the peer is told).

Dead peers stay watched and are still probed (directly, once a round, nothing counted against
anyone), carrying the verdict, so a peer wrongly declared dead, or one that restarted, refutes
and comes back (:class:`PeerRecovered`).

It is not a membership service: it never adds a peer by itself, and rumors about peers it does
not watch are ignored (except rumors about itself, which it refutes).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.wire import Address as WireAddress
from p2pdeploy.wire import NodeId, message, record

#: The most rumors one message may carry on the wire. With 16 rumors of the largest values and a
#: ping-req to a 45-character host name, a message stays under 1,100 bytes (tested).
MAX_UPDATES_ON_WIRE = 16
_INT_LIMIT = 1 << 64
#: Suspects checked directly each period (the least recently probed first).
MAX_SUSPECT_CHECKS = 8
#: The holder the overlay (Kademlia's routing table) watches its contacts as.
OVERLAY = "overlay"
#: Peers remembered per suspicion as having spread it (told directly of confirmations and verdicts).
MAX_RUMOR_SOURCES = 8


class Liveness(enum.Enum):
    """What this node believes about a peer."""

    alive = "alive"
    suspect = "suspect"
    dead = "dead"
    #: The peer is not watched.
    unknown = "unknown"


#: Rumor kinds, as they travel in :class:`Update.status`.
ALIVE, SUSPECT, DEAD = 0, 1, 2
_STATUS_OF = {ALIVE: Liveness.alive, SUSPECT: Liveness.suspect, DEAD: Liveness.dead}


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """The detector's knobs. The defaults suit a loopback or LAN network (round trips well
    under ``probe_timeout_s``); on a WAN scale the three durations up together.

    With the defaults a crashed peer is suspected within about a period after its first failed
    probe and convicted 3 s (enough confirmations) to 9 s (none) later; a node that stops for less
    than about 2.5 s is not convicted, because it refutes when it runs again.
    """

    #: Seconds between two probes (SWIM's protocol period T'), before local health scaling.
    protocol_period_s: float = 0.5
    #: Seconds to wait for a direct ack before asking for indirect probes, before scaling.
    probe_timeout_s: float = 0.2
    #: How many other peers a ping-req goes to (SWIM's k).
    indirect_probes: int = 3
    #: The shortest suspicion, in protocol periods: reached after ``confirmations`` confirmations.
    suspicion_min_mult: float = 6.0
    #: The longest suspicion (no confirmation), as a multiple of the shortest.
    suspicion_max_mult: float = 3.0
    #: Independent confirmations (Lifeguard's K) that drive a suspicion to its shortest timeout.
    confirmations: int = 3
    #: Local health awareness: the score stays in ``0 .. lha_max - 1``; timeouts scale by score + 1.
    lha_max: int = 8
    #: How many times each rumor is piggybacked before it is forgotten.
    gossip_transmissions: int = 12
    #: Rumors per message (at most :data:`MAX_UPDATES_ON_WIRE`).
    max_updates_per_message: int = 8
    #: Fraction of the time left in the period a relay waits for the target before it nacks.
    nack_fraction: float = 0.6
    #: Cap: peers watched at once (``watch`` beyond it raises).
    max_watched: int = 4096
    #: Cap: rumors waiting to be piggybacked (the most sent are forgotten first).
    max_gossip: int = 256
    #: Cap: ping-reqs this node relays at once for others (more are dropped and counted).
    max_relays: int = 64

    def __post_init__(self) -> None:
        require_positive(self, "DetectorConfig.", "protocol_period_s", "probe_timeout_s", "suspicion_min_mult")
        if not self.probe_timeout_s < self.protocol_period_s:
            raise ValueError(
                f"DetectorConfig.probe_timeout_s must be shorter than protocol_period_s "
                f"(got {self.probe_timeout_s} and {self.protocol_period_s})"
            )
        require_at_least(self, "DetectorConfig.", 1, "suspicion_max_mult")
        if not 0 < self.nack_fraction < 1:
            raise ValueError(
                f"DetectorConfig.nack_fraction must be between 0 and 1 (got {self.nack_fraction})"
            )
        if not 1 <= self.max_updates_per_message <= MAX_UPDATES_ON_WIRE:
            raise ValueError(
                f"DetectorConfig.max_updates_per_message must be between 1 and {MAX_UPDATES_ON_WIRE} "
                f"(got {self.max_updates_per_message})"
            )
        require_at_least(self, "DetectorConfig.", 0, "indirect_probes", "confirmations")
        require_at_least(self, "DetectorConfig.", 1, "lha_max", "gossip_transmissions", "max_watched", "max_gossip",
                         "max_relays")

    @property
    def suspicion_min_s(self) -> float:
        return self.suspicion_min_mult * self.protocol_period_s

    @property
    def suspicion_max_s(self) -> float:
        return self.suspicion_min_s * self.suspicion_max_mult


def suspicion_timeout_s(confirmations: int, config: DetectorConfig) -> float:
    """Lifeguard's suspicion timeout after ``confirmations`` independent confirmations."""
    low, high, k = config.suspicion_min_s, config.suspicion_max_s, config.confirmations
    if k < 1:
        return low
    fraction = math.log(min(confirmations, k) + 1) / math.log(k + 1)
    return max(low, high - (high - low) * fraction)


# -- messages ----------------------------------------------------------------------------------


def _check_int(name: str, value: int) -> None:
    if not 0 <= value < _INT_LIMIT:
        raise ValueError(f"{name} must be in 0 .. 2**64 - 1 (got {value})")


@record
class Update:
    """A rumor: ``node`` is alive, suspect or dead (``status``) at ``incarnation``, says ``origin``."""

    node: NodeId
    incarnation: int
    status: int
    origin: NodeId

    def __post_init__(self) -> None:
        _check_int("incarnation", self.incarnation)
        if self.status not in _STATUS_OF:
            raise ValueError(f"status must be 0 (alive), 1 (suspect) or 2 (dead) (got {self.status})")


def _check_updates(updates: tuple[Update, ...]) -> None:
    if len(updates) > MAX_UPDATES_ON_WIRE:
        raise ValueError(f"at most {MAX_UPDATES_ON_WIRE} updates per message (got {len(updates)})")


def _check_sequenced(msg: Probe | _Answer) -> None:
    """The checks of a message with a sequence number, an incarnation and rumors, in that order."""
    _check_int("seq", msg.seq)
    _check_int("incarnation", msg.incarnation)
    _check_updates(msg.updates)


@message(130)
class Probe:
    """SWIM's ping: "are you ``target``? ack ``seq``"."""

    seq: int
    sender: NodeId
    incarnation: int
    target: NodeId
    updates: tuple[Update, ...] = ()

    def __post_init__(self) -> None:
        _check_sequenced(self)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What an answer to a probe or a ping-req carries: the ``seq`` it answers, and its sender's
    incarnation and rumors (:class:`ProbeAck` and :class:`ProbeNack` differ only by their tag)."""

    seq: int
    sender: NodeId
    incarnation: int
    updates: tuple[Update, ...] = ()

    def __post_init__(self) -> None:
        _check_sequenced(self)


@message(131)
class ProbeAck(_Answer):
    """The answer to a probe, from ``sender`` (forwarded by a relay for an indirect probe)."""


@message(132)
class ProbeRequest:
    """SWIM's ping-req: probe ``target`` at ``target_address`` for me; nack after ``nack_after_s``."""

    seq: int
    sender: NodeId
    incarnation: int
    target: NodeId
    target_address: WireAddress
    nack_after_s: float
    updates: tuple[Update, ...] = ()

    def __post_init__(self) -> None:
        _check_int("seq", self.seq)
        _check_int("incarnation", self.incarnation)
        if not 0 <= self.nack_after_s <= 60:
            raise ValueError(f"nack_after_s must be between 0 and 60 (got {self.nack_after_s})")
        _check_updates(self.updates)


@message(133)
class ProbeNack(_Answer):
    """Lifeguard's nack: a relay (``sender``) got no ack from the target of ping-req ``seq``."""


@message(134)
class Rumors:
    """Rumors sent on their own: to a suspect (so it refutes) and a refutation to its accuser."""

    sender: NodeId
    incarnation: int
    updates: tuple[Update, ...]

    def __post_init__(self) -> None:
        _check_int("incarnation", self.incarnation)
        _check_updates(self.updates)


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSuspected:
    """A watched peer became suspect (this node's failed probe, or a rumor it adopted)."""

    node_id: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class PeerDeclaredDead:
    """A watched peer was declared dead (its suspicion expired here, or a verdict was gossiped)."""

    node_id: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    """A watched peer that was suspect or dead is alive again (refuted, or heard from)."""

    node_id: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class SuspicionRefuted:
    """This node heard it was suspected or declared dead and raised its incarnation."""

    incarnation: int


# -- state -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Suspicion:
    started_at: float
    deadline: float
    #: Origins of the suspicions counted (the first one started it; at most K + 1 kept).
    origins: list[int]
    #: This node raised it from its own failed probe (``heard`` may clear it).
    ours: bool
    #: Where suspect rumors about the peer came from: other watchers of it, told directly of
    #: this node's confirmation and verdict (at most :data:`MAX_RUMOR_SOURCES`).
    sources: list[Address] = field(default_factory=list)


@dataclass(slots=True)
class _Peer:
    node_id: int
    address: Address
    incarnation: int = 0
    state: Liveness = Liveness.alive
    suspicion: _Suspicion | None = None
    last_probed_at: float = -math.inf
    told_at: float = -math.inf
    verdict_shared_at: float = -math.inf
    #: When this node came to its current belief (watched, suspected, declared dead, recovered).
    since: float = 0.0
    #: The layers that watch this peer (``watch(..., by=...)``); it is forgotten when none is left.
    holders: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Probe:
    seq: int
    target: int
    address: Address
    direct_only: bool
    relays: list[Address] = field(default_factory=list)
    nacks: int = 0
    acked: bool = False


@dataclass(slots=True)
class _Relay:
    asker: Address
    asker_seq: int
    target: int


@dataclass(slots=True)
class _Rumor:
    update: Update
    sent: int = 0


@dataclass(frozen=True, slots=True)
class PeerView:
    """What this node believes about one watched peer, and since when (its ``now``)."""

    node_id: int
    state: Liveness
    incarnation: int
    since: float


@dataclass(slots=True)
class DetectorStats:
    """Counters of one detector: probes sent and failed, ping-req rounds, nacks, refutations, relays."""

    probes: int = 0
    probes_failed: int = 0
    indirect_requests: int = 0
    nacks_received: int = 0
    refutations: int = 0
    relayed: int = 0


class FailureDetector(Protocol):
    """SWIM with Lifeguard for the peers this node watches; see the module docstring."""

    handles = (Probe, ProbeAck, ProbeRequest, ProbeNack, Rumors)

    def __init__(self, node_id: int, rng: Rng, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.node_id = node_id
        self.rng = rng
        self.config = config or DetectorConfig()
        #: This node's own incarnation; only it raises it, to refute.
        self.incarnation = 0
        #: Lifeguard's local health score, ``0 .. lha_max - 1`` (0 is healthy).
        self.health = 0
        self.stats = DetectorStats()
        self._peers: dict[int, _Peer] = {}
        self._by_address: dict[Address, int] = {}
        self._order: list[int] = []
        self._order_index = 0
        #: Direct checks of suspects this period: seq -> node id.
        self._checks: dict[int, int] = {}
        self._probe: _Probe | None = None
        self._period_ends_at = 0.0
        self._relays: dict[int, _Relay] = {}
        self._gossip: dict[tuple[int, int], _Rumor] = {}
        self._seq = rng.getrandbits(32)

    # -- API (commands queue work) ---------------------------------------------------------
    def watch(self, node_id: int, address: Address, now: float, *, by: str = OVERLAY) -> None:
        """Start watching ``node_id`` at ``address`` on behalf of the holder ``by`` (alive until
        shown otherwise).

        Watching a watched peer again (by the same holder or another) adds the holder and
        updates the peer's address; what the detector believes of it is kept. ``max_watched``
        bounds the peers, not the holders: only a peer new to the detector can exceed it."""
        if node_id == self.node_id:
            raise ValueError("a node cannot watch itself")
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.holders.add(by)
            self._move(peer, address)
            return
        if len(self._peers) >= self.config.max_watched:
            raise RuntimeError(
                f"already watching {len(self._peers)} peers (DetectorConfig.max_watched); unwatch some first"
            )
        peer = self._peers[node_id] = _Peer(node_id, address, since=now, holders={by})
        self._by_address[address] = node_id
        # Into the rest of the current pass at a random place, as memberlist adds a node.
        position = self.rng.randrange(self._order_index, len(self._order) + 1)
        self._order.insert(position, node_id)
        if self.timer_deadline("period") is None:
            self.set_timer("period", now + self.rng.uniform(0, self._period_s()))

    def unwatch(self, node_id: int, *, by: str = OVERLAY) -> None:
        """The holder ``by`` stops watching ``node_id``. When no holder is left the peer is
        forgotten: its state, timers and rumors about it. A holder that does not watch the
        peer changes nothing."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        peer.holders.discard(by)
        if peer.holders:
            return
        del self._peers[node_id]
        if self._by_address.get(peer.address) == node_id:
            del self._by_address[peer.address]
        self.cancel_timer(("suspicion", node_id))
        for key in [key for key in self._gossip if key[0] == node_id]:
            del self._gossip[key]
        if self._probe is not None and self._probe.target == node_id:
            self.cancel_timer("probe_timeout")
            self._probe = None
        if len(self._order) > 2 * len(self._peers) + 16:
            self._order = [n for n in self._order if n in self._peers]
            self._order_index = min(self._order_index, len(self._order))

    def heard(self, node_id: int, address: Address, now: float) -> None:
        """A layer heard from ``node_id`` at ``address``: evidence of life.

        It clears a suspicion this node raised itself; a suspicion adopted from others (or a
        verdict) needs the peer's refutation, so the peer is told about it directly."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        self._move(peer, address)
        if peer.state is Liveness.suspect and peer.suspicion is not None and peer.suspicion.ours:
            self._recover(peer, peer.incarnation, now)
        elif peer.state is not Liveness.alive:
            self._tell(peer, now)

    # -- views -----------------------------------------------------------------------------
    def state(self, node_id: int) -> Liveness:
        peer = self._peers.get(node_id)
        return Liveness.unknown if peer is None else peer.state

    def alive(self, node_id: int) -> bool:
        return self.state(node_id) is Liveness.alive

    def suspect(self, node_id: int) -> bool:
        return self.state(node_id) is Liveness.suspect

    def dead(self, node_id: int) -> bool:
        return self.state(node_id) is Liveness.dead

    def since(self, node_id: int) -> float | None:
        """Since when this node has believed what it believes of ``node_id`` (None: not watched)."""
        peer = self._peers.get(node_id)
        return None if peer is None else peer.since

    def watched(self, by: str | None = None) -> list[int]:
        """The watched peers (in the order they were first watched), or only those ``by`` holds."""
        if by is None:
            return list(self._peers)
        return [node_id for node_id, peer in self._peers.items() if by in peer.holders]

    def holders(self, node_id: int) -> frozenset[str]:
        """The layers that watch ``node_id`` (empty when it is not watched)."""
        peer = self._peers.get(node_id)
        return frozenset() if peer is None else frozenset(peer.holders)

    def watch_count(self) -> int:
        """How many peers are watched (at most ``config.max_watched``)."""
        return len(self._peers)

    def incarnation_of(self, node_id: int) -> int | None:
        peer = self._peers.get(node_id)
        return None if peer is None else peer.incarnation

    def views(self, states: tuple[Liveness, ...] = (Liveness.suspect, Liveness.dead)) -> list[PeerView]:
        """The watched peers in one of ``states`` (by default the suspects and the dead), with
        what this node believes of each and since when."""
        return [
            PeerView(p.node_id, p.state, p.incarnation, p.since) for p in self._peers.values() if p.state in states
        ]

    def gossip_pending(self) -> int:
        """Rumors waiting to be piggybacked."""
        return len(self._gossip)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is Probe:
            self._on_probe(src, msg, now)
        elif kind is ProbeAck:
            self._on_ack(src, msg, now)
        elif kind is ProbeRequest:
            self._on_request(src, msg, now)
        elif kind is ProbeNack:
            self._on_nack(src, msg, now)
        elif kind is Rumors:
            if msg.sender == self.node_id:
                self.dropped["from_self"] += 1
                return
            self._direct(msg.sender, msg.incarnation, now)
            self._apply(msg.updates, src, now)
        else:
            self.dropped["unexpected"] += 1

    def _on_probe(self, src: Address, msg: Probe, now: float) -> None:
        if msg.target != self.node_id:
            self.dropped["misaddressed"] += 1  # the address now belongs to another node
            return
        if msg.sender == self.node_id:
            self.dropped["from_self"] += 1
            return
        self._apply(msg.updates, src, now)  # first, so the ack carries a refutation
        self._direct(msg.sender, msg.incarnation, now)
        self.send(src, ProbeAck(msg.seq, self.node_id, self.incarnation, self._updates_for(msg.sender)))

    def _on_ack(self, src: Address, msg: ProbeAck, now: float) -> None:
        relay = self._relays.get(msg.seq)
        if relay is not None and relay.target == msg.sender:
            # An ack for a probe made on someone's behalf: forward it, vouching for the target.
            del self._relays[msg.seq]
            self.cancel_timer(("relay", msg.seq))
            self.send(
                relay.asker, ProbeAck(relay.asker_seq, msg.sender, msg.incarnation, self._updates_for(None))
            )
            self._direct(msg.sender, msg.incarnation, now)
            self._apply(msg.updates, src, now)
            return
        checked = self._checks.get(msg.seq)
        if checked is not None and checked == msg.sender:
            del self._checks[msg.seq]
            self._direct(msg.sender, msg.incarnation, now)
            self._apply(msg.updates, src, now)
            return
        probe = self._probe
        if probe is None or probe.seq != msg.seq or probe.target != msg.sender:
            self.dropped["unsolicited_ack"] += 1
            return
        if src != probe.address and src not in probe.relays:
            self.dropped["unsolicited_ack"] += 1
            return
        if not probe.acked:
            probe.acked = True
            self.cancel_timer("probe_timeout")
        # Straight from the target, or forwarded by a relay vouching for it: evidence either way.
        self._direct(msg.sender, msg.incarnation, now)
        self._apply(msg.updates, src, now)

    def _on_request(self, src: Address, msg: ProbeRequest, now: float) -> None:
        if msg.sender == self.node_id or msg.target == self.node_id or msg.target == msg.sender:
            self.dropped["bad_request"] += 1
            return
        self._direct(msg.sender, msg.incarnation, now)
        self._apply(msg.updates, src, now)
        if len(self._relays) >= self.config.max_relays:
            self.dropped["relay_overload"] += 1
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(src, msg.seq, msg.target)
        self.stats.relayed += 1
        self.send(
            msg.target_address,
            Probe(seq, self.node_id, self.incarnation, msg.target, self._updates_for(msg.target)),
        )
        self.set_timer(("relay", seq), now + msg.nack_after_s)

    def _on_nack(self, src: Address, msg: ProbeNack, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != msg.seq or src not in probe.relays:
            self.dropped["unsolicited_nack"] += 1
            return
        probe.nacks += 1
        self.stats.nacks_received += 1
        self._direct(msg.sender, msg.incarnation, now)
        self._apply(msg.updates, src, now)

    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "period":
            self._end_period(now)
        elif name == "checks":
            self._check_suspects(now)
        elif name == "probe_timeout":
            self._ask_for_indirect_probes(now)
        elif isinstance(name, tuple) and name[0] == "suspicion":
            self._suspicion_expired(name[1], now)
        elif isinstance(name, tuple) and name[0] == "relay":
            relay = self._relays.pop(name[1], None)
            if relay is not None:
                self.send(
                    relay.asker,
                    ProbeNack(relay.asker_seq, self.node_id, self.incarnation, self._updates_for(None)),
                )

    # -- probing ---------------------------------------------------------------------------
    def _period_s(self) -> float:
        return self.config.protocol_period_s * (self.health + 1)

    def _end_period(self, now: float) -> None:
        probe, self._probe = self._probe, None
        self.cancel_timer("probe_timeout")
        if probe is not None:
            self._conclude(probe, now - self._period_ends_at, now)
        if self._peers:
            self._start_probe(now)

    def _conclude(self, probe: _Probe, late_s: float, now: float) -> None:
        peer = self._peers.get(probe.target)
        if probe.acked:
            self._health(-1)
            return
        if peer is None or probe.direct_only:
            return
        if late_s > self.config.probe_timeout_s:
            # This node did not run when its timer was due: the silence may be ours. Lifeguard's
            # reasoning for missed nacks; no accusation, and the node slows down.
            self._health(+1)
            return
        self.stats.probes_failed += 1
        if probe.relays:
            self._health(len(probe.relays) - probe.nacks)
        else:
            self._health(+1)
        self._suspect(peer, peer.incarnation, self.node_id, now)

    def _start_probe(self, now: float) -> None:
        target = self._next_target()
        self._period_ends_at = now + self._period_s()
        self.set_timer("period", self._period_ends_at)
        if target is None:
            return
        peer = self._peers[target]
        peer.last_probed_at = now
        seq = self._next_seq()
        self._probe = _Probe(seq, target, peer.address, direct_only=peer.state is Liveness.dead)
        self.stats.probes += 1
        self.send(peer.address, Probe(seq, self.node_id, self.incarnation, target, self._updates_for(target)))
        if peer.state is not Liveness.dead:
            self.set_timer("probe_timeout", now + self.config.probe_timeout_s * (self.health + 1))

    def _check_suspects(self, now: float) -> None:
        """A direct probe to each suspect every protocol period, carrying the suspicion: a live
        suspect refutes in its ack, so its refutation reaches every watcher that suspects it
        within a period, without waiting for gossip. Not scaled by local health: a check can
        only clear a suspicion, never raise one."""
        self._checks.clear()
        target = self._probe.target if self._probe is not None else None
        suspects = [p for p in self._peers.values() if p.state is Liveness.suspect and p.node_id != target]
        if not any(p.state is Liveness.suspect for p in self._peers.values()):
            return
        self.set_timer("checks", now + self.config.protocol_period_s)
        if len(suspects) > MAX_SUSPECT_CHECKS:
            suspects = sorted(suspects, key=lambda p: p.last_probed_at)[:MAX_SUSPECT_CHECKS]
        for peer in suspects:
            seq = self._next_seq()
            self._checks[seq] = peer.node_id
            self.send(
                peer.address,
                Probe(seq, self.node_id, self.incarnation, peer.node_id, self._updates_for(peer.node_id)),
            )

    def _next_target(self) -> int | None:
        # A suspicion adopted from gossip gets this node's own full probe first: its failure is
        # an independent confirmation (which shortens everyone's timeout), its ack a refutation.
        unconfirmed = [
            p
            for p in self._peers.values()
            if p.suspicion is not None
            and self.node_id not in p.suspicion.origins
            and len(p.suspicion.origins) <= self.config.confirmations
        ]
        if unconfirmed:
            return min(unconfirmed, key=lambda p: p.last_probed_at).node_id
        for _ in range(2):
            while self._order_index < len(self._order):
                node_id = self._order[self._order_index]
                self._order_index += 1
                if node_id in self._peers:
                    return node_id
            self._order = list(self._peers)
            self.rng.shuffle(self._order)
            self._order_index = 0
        return None

    def _ask_for_indirect_probes(self, now: float) -> None:
        probe = self._probe
        if probe is None or probe.acked:
            return
        candidates = [
            p for p in self._peers.values() if p.state is Liveness.alive and p.node_id != probe.target
        ]
        k = min(self.config.indirect_probes, len(candidates))
        if k == 0:
            return
        nack_after_s = min(60.0, max(0.0, (self._period_ends_at - now) * self.config.nack_fraction))
        self.stats.indirect_requests += 1
        for relay in self.rng.sample(candidates, k):
            probe.relays.append(relay.address)
            self.send(
                relay.address,
                ProbeRequest(
                    probe.seq,
                    self.node_id,
                    self.incarnation,
                    probe.target,
                    probe.address,  # type: ignore[arg-type]
                    nack_after_s,
                    self._updates_for(relay.node_id),
                ),
            )

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _INT_LIMIT
        return self._seq

    def _health(self, delta: int) -> None:
        self.health = min(self.config.lha_max - 1, max(0, self.health + delta))

    # -- evidence and rumors ---------------------------------------------------------------
    def _direct(self, node_id: int, incarnation: int, now: float) -> None:
        """A message straight from ``node_id`` carrying its incarnation."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        if incarnation > peer.incarnation:
            was = peer.state
            self._recover(peer, incarnation, now)
            if was is not Liveness.alive:
                self._enqueue(Update(node_id, incarnation, ALIVE, node_id))  # type: ignore[arg-type]
        elif peer.state is Liveness.suspect and peer.suspicion is not None and peer.suspicion.ours:
            self._recover(peer, peer.incarnation, now)

    def _apply(self, updates: tuple[Update, ...], src: Address, now: float) -> None:
        for update in updates:
            if update.node == self.node_id:
                self._about_me(update, src, now)
                continue
            peer = self._peers.get(update.node)
            if peer is None:
                continue  # not watched here: membership is not global
            if update.status == ALIVE:
                if update.incarnation > peer.incarnation:
                    was = peer.state
                    self._recover(peer, update.incarnation, now)
                    if was is not Liveness.alive:
                        self._enqueue(update)
            elif update.status == SUSPECT:
                if peer.state is Liveness.dead and update.incarnation <= peer.incarnation:
                    self._share_verdict(peer, src, now)
                else:
                    self._suspect(peer, update.incarnation, update.origin, now, src)
            elif update.incarnation >= peer.incarnation and peer.state is not Liveness.dead:
                self._declare_dead(peer, update.incarnation, update.origin, now, src)

    def _about_me(self, update: Update, src: Address, now: float) -> None:
        if update.status == ALIVE or update.incarnation < self.incarnation:
            return
        self.incarnation = update.incarnation + 1
        self.stats.refutations += 1
        self._health(+1)
        refutation = Update(self.node_id, self.incarnation, ALIVE, self.node_id)  # type: ignore[arg-type]
        self._enqueue(refutation)
        self.send(src, Rumors(self.node_id, self.incarnation, (refutation,)))
        self.emit(SuspicionRefuted(self.incarnation))

    def _suspect(
        self, peer: _Peer, incarnation: int, origin: int, now: float, src: Address | None = None
    ) -> None:
        if incarnation < peer.incarnation or peer.state is Liveness.dead:
            return
        ours = origin == self.node_id
        suspicion = peer.suspicion
        if peer.state is Liveness.suspect and incarnation == peer.incarnation and suspicion is not None:
            self._note_source(peer, suspicion, src)
            # A confirmation, counted once per origin, up to K.
            if origin in suspicion.origins or len(suspicion.origins) > self.config.confirmations:
                return
            suspicion.origins.append(origin)
            update = Update(peer.node_id, incarnation, SUSPECT, origin)  # type: ignore[arg-type]
            self._enqueue(update)
            if ours:
                # The peers that spread this suspicion watch the suspect too: they count our
                # confirmation at once instead of when gossip brings it.
                for address in suspicion.sources:
                    self.send(address, Rumors(self.node_id, self.incarnation, (update,)))
            self._arm_suspicion(peer, suspicion, now)
            return
        peer.state = Liveness.suspect
        peer.since = now
        peer.incarnation = incarnation
        peer.suspicion = _Suspicion(now, now, [origin], ours)
        self._note_source(peer, peer.suspicion, src)
        self._enqueue(Update(peer.node_id, incarnation, SUSPECT, origin))  # type: ignore[arg-type]
        self._arm_suspicion(peer, peer.suspicion, now)
        self.emit(PeerSuspected(peer.node_id, incarnation))
        if self.timer_deadline("checks") is None:
            self.set_timer("checks", now + self.config.protocol_period_s)
        if ours:
            self._tell(peer, now)

    def _note_source(self, peer: _Peer, suspicion: _Suspicion, src: Address | None) -> None:
        if (
            src is not None
            and src != peer.address
            and src not in suspicion.sources
            and len(suspicion.sources) < MAX_RUMOR_SOURCES
        ):
            suspicion.sources.append(src)

    def _arm_suspicion(self, peer: _Peer, suspicion: _Suspicion, now: float) -> None:
        confirmations = len(suspicion.origins) - 1
        # Not before now: a confirmation that shortens the timeout into the past convicts at once.
        suspicion.deadline = max(now, suspicion.started_at + suspicion_timeout_s(confirmations, self.config))
        self.set_timer(("suspicion", peer.node_id), suspicion.deadline)

    def _suspicion_expired(self, node_id: int, now: float) -> None:
        peer = self._peers.get(node_id)
        if peer is None or peer.state is not Liveness.suspect or peer.suspicion is None:
            return
        if now - peer.suspicion.deadline > self.config.probe_timeout_s:
            # The timer fired late: this node was not running and may have missed the refutation.
            self._health(+1)
            peer.suspicion.deadline = now + self._period_s()
            self.set_timer(("suspicion", node_id), peer.suspicion.deadline)
            return
        self._declare_dead(peer, peer.incarnation, self.node_id, now)

    def _declare_dead(
        self, peer: _Peer, incarnation: int, origin: int, now: float, src: Address | None = None
    ) -> None:
        sources = peer.suspicion.sources if peer.suspicion is not None else []
        verdict = Update(peer.node_id, incarnation, DEAD, origin)  # type: ignore[arg-type]
        for address in sources:
            if address != src:  # the other watchers we know of hear the verdict at once
                self.send(address, Rumors(self.node_id, self.incarnation, (verdict,)))
        peer.state = Liveness.dead
        peer.since = now
        peer.incarnation = incarnation
        peer.suspicion = None
        self.cancel_timer(("suspicion", peer.node_id))
        self._forget_rumors(peer.node_id)
        self._enqueue(verdict)
        self.emit(PeerDeclaredDead(peer.node_id, incarnation))

    def _recover(self, peer: _Peer, incarnation: int, now: float) -> None:
        was = peer.state
        peer.incarnation = incarnation
        peer.state = Liveness.alive
        peer.suspicion = None
        self.cancel_timer(("suspicion", peer.node_id))
        if was is not Liveness.alive:
            peer.since = now
            self._forget_rumors(peer.node_id)
            self.emit(PeerRecovered(peer.node_id, incarnation))

    def _tell(self, peer: _Peer, now: float) -> None:
        """Tell a suspect (or a peer held dead) directly, at most once a period, so it refutes."""
        if now - peer.told_at < self.config.protocol_period_s:
            return
        peer.told_at = now
        self.send(peer.address, Rumors(self.node_id, self.incarnation, (self._rumor_about(peer),)))

    def _share_verdict(self, peer: _Peer, src: Address, now: float) -> None:
        """A watcher still suspects a peer held dead here: hand it the verdict (once a period)."""
        if src == peer.address or now - peer.verdict_shared_at < self.config.protocol_period_s:
            return
        peer.verdict_shared_at = now
        verdict = Update(peer.node_id, peer.incarnation, DEAD, self.node_id)  # type: ignore[arg-type]
        self.send(src, Rumors(self.node_id, self.incarnation, (verdict,)))

    def _rumor_about(self, peer: _Peer) -> Update:
        status = SUSPECT if peer.state is Liveness.suspect else DEAD
        return Update(peer.node_id, peer.incarnation, status, self.node_id)  # type: ignore[arg-type]

    def _move(self, peer: _Peer, address: Address) -> None:
        if address != peer.address:
            if self._by_address.get(peer.address) == peer.node_id:
                del self._by_address[peer.address]
            peer.address = address
            self._by_address[address] = peer.node_id

    # -- dissemination ---------------------------------------------------------------------
    def _enqueue(self, update: Update) -> None:
        if update.status != SUSPECT:
            self._forget_rumors(update.node)
        key = (update.node, update.origin if update.status == SUSPECT else -1)
        self._gossip[key] = _Rumor(update)
        if len(self._gossip) > self.config.max_gossip:
            worst = max(self._gossip, key=lambda k: self._gossip[k].sent)
            del self._gossip[worst]

    def _forget_rumors(self, node_id: int) -> None:
        for key in [key for key in self._gossip if key[0] == node_id]:
            del self._gossip[key]

    def _updates_for(self, dst: int | None) -> tuple[Update, ...]:
        """Rumors to piggyback on a message to ``dst``: any about ``dst`` itself first."""
        limit = self.config.max_updates_per_message
        chosen: list[Update] = []
        told_dst = False
        if dst is not None:
            peer = self._peers.get(dst)
            if peer is not None and peer.state is not Liveness.alive:
                chosen.append(self._rumor_about(peer))
                told_dst = True
        if not self._gossip:
            return tuple(chosen)
        rumors = sorted(self._gossip.items(), key=lambda item: item[1].sent)
        for key, rumor in rumors:
            if len(chosen) >= limit:
                break
            if told_dst and rumor.update.node == dst:
                continue
            chosen.append(rumor.update)
            rumor.sent += 1
            if rumor.sent >= self.config.gossip_transmissions:
                del self._gossip[key]
        return tuple(chosen)
