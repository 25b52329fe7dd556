"""Admission control: a ledger of reservations against the owner's contribution.

Every replica a node runs holds a reservation (cores, memory, disk, bandwidth, one service
slot) from the moment it is admitted until it ends. :meth:`Admission.admit` answers whether a
new demand fits, and when it does not, which resource refused it and by how much
(``cpu: 1 core asked, 0 of 2 free``), so a deployer knows what to change. Reservations are
what the owner promised, not measured use: a replica that idles still holds its share. A
replica that ended keeps only its disk (:meth:`Admission.retain`) while its files stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from p2pdeploy.core import require_at_least
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.units import format_bandwidth, format_cores, format_cores_number, format_size

#: Slack for sums of fractional cores (0.1 + 0.2 is not 0.3 in floating point).
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Demand:
    """What a replica reserves on the node that runs it."""

    cpu_cores: float = 0.0
    memory_bytes: int = 0
    disk_bytes: int = 0
    bandwidth_bps: int = 0
    tags: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        require_at_least(self, "demand.", 0, "cpu_cores", "memory_bytes", "disk_bytes", "bandwidth_bps")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why something was not admitted: the resource (``cpu``, ``trust``, ...) and the details."""

    resource: str
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class Free:
    """What is left of the contribution after the current reservations."""

    cpu_cores: float
    memory_bytes: int
    disk_bytes: int
    bandwidth_bps: int | None
    services: int


class Admission:
    """The reservations of one node against its contribution."""

    def __init__(self, contribution: Contribution) -> None:
        self.contribution = contribution
        self._reservations: dict[str, Demand] = {}
        #: Disk still held by replicas that ended, until their files are removed.
        self._retained: dict[str, int] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def reservations(self) -> dict[str, Demand]:
        return dict(self._reservations)

    @property
    def retained(self) -> dict[str, int]:
        """Disk bytes held by replicas that ended, whose files are still on disk."""
        return dict(self._retained)

    def free(self) -> Free:
        c = self.contribution
        held = list(self._reservations.values())
        return Free(
            cpu_cores=max(0.0, c.cpu_cores - sum(d.cpu_cores for d in held)),
            memory_bytes=max(0, c.memory_bytes - sum(d.memory_bytes for d in held)),
            disk_bytes=max(0, c.disk_bytes - sum(d.disk_bytes for d in held) - sum(self._retained.values())),
            bandwidth_bps=None if c.bandwidth_bps is None else max(0, c.bandwidth_bps - sum(d.bandwidth_bps for d in held)),
            services=max(0, c.max_services - len(held)),
        )

    def admit(self, demand: Demand) -> Refusal | None:
        """``None`` when ``demand`` fits next to the current reservations, else the first refusal."""
        c = self.contribution
        reason = c.tags_refusal(demand.tags)
        if reason is not None:
            return Refusal("tags", reason)
        free = self.free()
        if free.services < 1:
            return Refusal("services", f"services: {c.max_services} of {c.max_services} running (the owner's max_services)")
        if demand.cpu_cores > free.cpu_cores + _EPSILON:
            return Refusal(
                "cpu",
                f"cpu: {format_cores(demand.cpu_cores)} asked, "
                f"{format_cores_number(free.cpu_cores)} of {format_cores_number(c.cpu_cores)} free",
            )
        if demand.memory_bytes > free.memory_bytes:
            return Refusal(
                "memory",
                f"memory: {format_size(demand.memory_bytes)} asked, "
                f"{format_size(free.memory_bytes)} of {format_size(c.memory_bytes)} free",
            )
        if demand.disk_bytes > free.disk_bytes:
            return Refusal(
                "disk",
                f"disk: {format_size(demand.disk_bytes)} asked, "
                f"{format_size(free.disk_bytes)} of {format_size(c.disk_bytes)} free",
            )
        if free.bandwidth_bps is not None and c.bandwidth_bps is not None and demand.bandwidth_bps > free.bandwidth_bps:
            return Refusal(
                "bandwidth",
                f"bandwidth: {format_bandwidth(demand.bandwidth_bps)} asked, "
                f"{format_bandwidth(free.bandwidth_bps)} of {format_bandwidth(c.bandwidth_bps)} free",
            )
        return None

    # -- the ledger ------------------------------------------------------------------------
    def reserve(self, replica_id: str, demand: Demand) -> Refusal | None:
        """Admit ``demand`` and hold it for ``replica_id``; the refusal when it does not fit."""
        if replica_id in self._reservations:
            return Refusal("replica", f"replica: {replica_id} already holds a reservation on this node")
        retained = self._retained.pop(replica_id, None)  # the same id starts again in its files
        refusal = self.admit(demand)
        if refusal is None:
            self._reservations[replica_id] = demand
        elif retained is not None:
            self._retained[replica_id] = retained
        return refusal

    def release(self, replica_id: str) -> Demand | None:
        """Give back what ``replica_id`` held, its retained disk too (``None`` when it held no reservation)."""
        self._retained.pop(replica_id, None)
        return self._reservations.pop(replica_id, None)

    def retain(self, replica_id: str) -> None:
        """``replica_id`` ended: give back all it held but its disk, which its files still take."""
        demand = self._reservations.pop(replica_id, None)
        if demand is not None:
            self._retained[replica_id] = demand.disk_bytes

    def hold_files(self, replica_id: str, disk_bytes: int) -> None:
        """Files ``replica_id`` left (an earlier run of the node's) take ``disk_bytes`` until removed."""
        if replica_id not in self._reservations:
            self._retained[replica_id] = disk_bytes

    def holders(self) -> Iterable[str]:
        return tuple(self._reservations)
