"""Describing nodes and matching services to them, in the requirements language.

A node's description is a flat mapping of attributes: the machine's facts (``os``, ``arch``,
``cores``, ``memory_total``, ``load``...), what the owner contributes (``cpu``, ``memory``,
``disk``, ``bandwidth``, ``max_services``, ``tags``, ``owner``) and what is still free
(``cpu_free``, ``memory_free``, ``disk_free``, ``bandwidth_free``, ``services_free``). The
prospector aggregates these; a service's :class:`Match` says whether a node fits and, when it
does not, which clause failed (``memory_free >= 512M (memory_free is 256 MiB)``).

:class:`NodeDescription` is the layer that keeps a node's description current: it watches the
replica host's events (a reservation made or released changes what is free) and the machine the
driver probes, and announces each new description as :class:`DescriptionChanged`, which the
prospector consumes.

A node that measures its own uptime (:mod:`p2pdeploy.fabric.uptime`) also advertises
``availability``, the share of the last 30 days it was up (0 to 1), which the deployer reads to
size replica counts. The driver refreshes it every heartbeat; the description changes only when
it moved by :data:`AVAILABILITY_STEP` or more, so a slowly drifting figure does not make the
prospector republish the node every minute.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pdeploy.core import Address, Protocol
from p2pdeploy.fabric.admission import Demand, Free
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import RemoveReplica
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaStateChanged
from p2pdeploy.fabric.units import format_cores_number, format_size
from p2pdeploy.resource.requirements import And, Attribute, Compare, Literal, Node, Requirement

#: The least change of availability that changes the description.
AVAILABILITY_STEP = 0.005


def node_attributes(
    contribution: Contribution,
    free: Free | None = None,
    machine: Machine | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The attributes of a node: machine facts, the contribution, what is free, and ``extra``."""
    attrs: dict[str, Any] = machine.attributes() if machine is not None else {}
    attrs.update(
        cpu=contribution.cpu_cores,
        memory=contribution.memory_bytes,
        disk=contribution.disk_bytes,
        max_services=contribution.max_services,
        tags=contribution.tags,
    )
    if contribution.bandwidth_bps is not None:
        attrs["bandwidth"] = contribution.bandwidth_bps
    if contribution.owner:
        attrs["owner"] = contribution.owner
    if free is not None:
        attrs.update(
            cpu_free=free.cpu_cores,
            memory_free=free.memory_bytes,
            disk_free=free.disk_bytes,
            services_free=free.services,
        )
        if free.bandwidth_bps is not None:
            attrs["bandwidth_free"] = free.bandwidth_bps
    attrs.update(extra)
    return attrs


def demand_requirement(demand: Demand) -> Requirement | None:
    """The demand as a requirement on free resources (``cpu_free >= 0.5 and ...``)."""
    clauses: list[Node] = [Compare(">=", Attribute("services_free"), Literal(1))]
    if demand.cpu_cores > 0:
        clauses.append(Compare(">=", Attribute("cpu_free"), Literal(demand.cpu_cores, format_cores_number(demand.cpu_cores))))
    if demand.memory_bytes > 0:
        clauses.append(Compare(">=", Attribute("memory_free"), Literal(demand.memory_bytes, _size_text(demand.memory_bytes))))
    if demand.disk_bytes > 0:
        clauses.append(Compare(">=", Attribute("disk_free"), Literal(demand.disk_bytes, _size_text(demand.disk_bytes))))
    return Requirement(clauses[0] if len(clauses) == 1 else And(tuple(clauses)))


def _size_text(size_bytes: int) -> str:
    """``536870912`` -> ``512M``, when it is a whole number of a unit; plain bytes otherwise."""
    text = format_size(size_bytes)  # "512 MiB", "1.5 GiB", "100 B"
    number, unit = text.split(" ")
    if "." in number or unit == "B":
        return str(size_bytes)
    return number + unit[0]


@dataclass(frozen=True, slots=True)
class Match:
    ok: bool
    failed: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "matches" if self.ok else "; ".join(self.failed)


def match(attrs: Mapping[str, Any], requirement: Requirement | None = None, demand: Demand | None = None) -> Match:
    """Whether a node with ``attrs`` fits a service's ``requirement`` and ``demand``, and what failed."""
    failed: list[str] = []
    if demand is not None:
        needed = demand_requirement(demand)
        if needed is not None:
            failed.extend(needed.explain(attrs))
    if requirement is not None:
        failed.extend(requirement.explain(attrs))
    return Match(not failed, tuple(failed))


@dataclass(frozen=True, slots=True)
class DescriptionChanged:
    """This node's attributes changed (or were first known): what the prospector publishes."""

    attributes: dict[str, Any]


class NodeDescription(Protocol):
    """This node's description as a layer: emits :class:`DescriptionChanged` when it changes.

    Built with what the node is (its machine, its contribution) and, on a hosting node, its
    :class:`~p2pdeploy.fabric.replicas.ReplicaHost`, whose state changes it watches without
    consuming them. A node without a contribution is described by its machine alone.
    """

    consumes = (ReplicaStateChanged, RemoveReplica)

    def __init__(self, contribution: Contribution | None = None, host: ReplicaHost | None = None,
                 machine: Machine | None = None) -> None:
        super().__init__()
        self.contribution = contribution
        self.host = host
        self.machine = machine
        #: The availability advertised (the share of recent time this node was up), or None.
        self.availability: float | None = None
        self._attributes: dict[str, Any] | None = None
        self._refresh()

    def attributes(self) -> dict[str, Any]:
        """The current description (a copy)."""
        return dict(self._attributes or {})

    def set_machine(self, machine: Machine, now: float) -> None:
        """The driver probed the machine again (free memory and disk, load)."""
        self.machine = machine
        self._refresh()

    def set_availability(self, fraction: float | None, now: float) -> None:
        """The driver measured this node's availability again (None: not known yet). The
        description changes when it moved by :data:`AVAILABILITY_STEP` or more, or became
        known or unknown."""
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not math.isfinite(fraction) or not 0 <= fraction <= 1):
            raise ValueError(f"availability must be a number in [0, 1] or None (got {fraction!r})")
        old = self.availability
        if fraction is None:
            if old is None:
                return
        elif old is not None and abs(fraction - old) < AVAILABILITY_STEP:
            return
        self.availability = None if fraction is None else float(fraction)
        self._refresh()

    def handle_event(self, event: Any, now: float) -> bool:
        self._refresh()
        return False  # the replica's state is news for the layers above and the driver too

    def _refresh(self) -> None:
        if self.contribution is None:
            attributes = dict(self.machine.attributes()) if self.machine is not None else {}
        else:
            free = self.host.admission.free() if self.host is not None else None
            attributes = node_attributes(self.contribution, free, self.machine)
        if self.availability is not None:
            attributes["availability"] = self.availability
        if attributes != self._attributes:
            self._attributes = attributes
            self.emit(DescriptionChanged(dict(attributes)))

    def receive(self, src: Address, msg: Any, now: float) -> None:
        self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        pass  # arms no timers
