"""A service's manager: what it keeps of one service, and the rules its reconciler follows.

:class:`ServiceManager` is one child of the :class:`~p2pdeploy.collective.deployment.Deployment`
layer per service the node manages: the desired state (the record's :class:`ServiceSpec` and its
manifest), the replicas it sees (:class:`Placed`, from its own starts and the hosts' reports),
the count the deployer chose and why, what is pending, and its decisions. The functions here
are the reconciler's pure rules: which requirement a candidate must meet, which replicas go
first when there are too many. The layer runs the loop (desired vs observed, then act).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.collective.allocator import Offer
from p2pdeploy.collective.deployment_messages import (
    MAX_DECISIONS,
    MAX_REPORTED,
    Decision,
    PlacedReplica,
    ServiceId,
    ServiceSpec,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.description import demand_requirement
from p2pdeploy.resource.manifest import Manifest
from p2pdeploy.resource.requirements import And, Requirement

#: Replica states that count towards the desired number.
LIVE_STATES = frozenset({"requested", "fetching", "installing", "starting", "running"})


@dataclass(slots=True)
class Placed:
    """A replica as its manager knows it."""

    replica_id: str
    host: Contact
    state: str
    since_s: float
    bundle_blob: bytes
    reason: str = ""
    healthy: bool = True
    reported_s: float = 0.0
    #: When it last was fine (not failed, not unhealthy): the unhealthy grace counts from it.
    fine_s: float = 0.0
    stopping: bool = False
    #: When the last stop was sent (it is sent again while its host still reports it running).
    stop_sent_s: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)
    #: When the replica it replaces was lost (its replacement time ends when this one runs).
    replaces_lost_s: float | None = None
    #: This manager started it, or its host answered a signed query for it: a replica only
    #: reported (by anyone) does not count until its host confirms it.
    confirmed: bool = True
    #: A query about it is on its way (its live host stopped reporting it).
    asking: bool = False

    def heard(self, status: Any, now: float) -> None:
        """Its host told its state, reason and health (a report's entry, a status reply)."""
        self.state, self.reason, self.healthy = status.state, status.reason, status.healthy
        self.reported_s = now

    @property
    def live(self) -> bool:
        return self.confirmed and self.state in LIVE_STATES and not self.stopping

    @property
    def counts(self) -> bool:
        """It counts towards the desired number: live, or failed but within its grace (it may
        restart; once the grace is over it is stopped and replaced)."""
        return self.confirmed and not self.stopping and (self.state in LIVE_STATES or self.state == "failed")

    def view(self) -> PlacedReplica:
        return PlacedReplica(self.replica_id, self.host, "stopping" if self.stopping and self.state in LIVE_STATES
                             else self.state, self.reason, self.healthy, self.since_s, self.bundle_blob)


@dataclass(slots=True)
class ServiceManager:
    """What a manager keeps of one service: the desired state and the replicas it sees."""

    service: ServiceId
    key: int
    group: list[Contact]
    spec: ServiceSpec | None = None
    version: int = 0
    manifest: Manifest | None = None
    invalid: str = ""
    replicas: dict[str, Placed] = field(default_factory=dict)
    desired: int = 0
    desired_reason: str = ""
    #: No placement before it (a new manager waits for the hosts' reports).
    grace_until: float = 0.0
    prospecting: int | None = None
    next_search_s: float = 0.0
    last_candidates_s: float = -math.inf
    refused: dict[int, float] = field(default_factory=dict)
    #: The candidates of the last search: a replacement goes to one of them at once (a search
    #: right after a crash may wait for the dead node's part of the tree to time out).
    offers: list[Offer] = field(default_factory=list)
    pending: str = ""
    #: When replicas were lost and not yet replaced (oldest first).
    lost_at: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_REPORTED))
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))
    refreshing: int | None = None
    next_refresh_s: float = 0.0
    #: When it next tells the other members of the group that it manages.
    next_alive_s: float = 0.0
    #: Replicas that failed one after another (reset when one runs healthy): the placement backs off.
    failures: int = 0

    @property
    def placement(self) -> Any:
        assert self.manifest is not None and self.spec is not None
        placement = self.manifest.placement
        if self.spec.replicas:
            return dataclasses.replace(placement, replicas=self.spec.replicas, availability=None, mode="count")
        if self.spec.availability:
            return dataclasses.replace(placement, availability=self.spec.availability, replicas=None, mode="count")
        return placement

    def live(self) -> list[Placed]:
        return [p for p in self.replicas.values() if p.live]

    def counted(self) -> list[Placed]:
        return [p for p in self.replicas.values() if p.counts]



def _combined(manifest: Manifest, constraints: Requirement | None) -> Requirement:
    """What a node must satisfy and have free to take a replica, as one requirement."""
    parts = [r.node for r in (manifest.resources.requirements, constraints, demand_requirement(manifest.demand()))
             if r is not None]
    return Requirement(parts[0] if len(parts) == 1 else And(tuple(parts)))


def _constraints(manifest: Manifest, placement: Any) -> Requirement | None:
    parts = [r.node for r in (manifest.resources.requirements, placement.constraints) if r is not None]
    if not parts:
        return None
    return Requirement(parts[0] if len(parts) == 1 else And(tuple(parts)))


def _removal_order(replicas: list[Placed]) -> list[Placed]:
    """Which replicas go first when there are too many: a second one on a node (after a partition
    healed, both sides may have placed there), then those not running healthy, then the newest."""
    keep_first = sorted(replicas, key=lambda p: (not (p.state == "running" and p.healthy), p.since_s, p.replica_id))
    seen: set[int] = set()
    doubles: set[str] = set()
    for placed in keep_first:
        if placed.host.node_id in seen:
            doubles.add(placed.replica_id)
        seen.add(placed.host.node_id)
    return sorted(replicas, key=lambda p: (p.replica_id not in doubles, p.state == "running" and p.healthy,
                                           -p.since_s, p.replica_id))


def _why_there(offer: Offer) -> str:
    attributes = offer.attributes
    parts = [f"{name} {attributes[name]}" for name in ("owner", "availability", "services_free") if name in attributes]
    return ", ".join(parts)


def _short(contact: Contact | None) -> str:
    return "nobody" if contact is None else f"{contact.node_id:040x}"[:12]


__all__ = ["LIVE_STATES", "Placed", "ServiceManager"]
