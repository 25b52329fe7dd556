"""The deployer's replica count: how many replicas a service needs to meet its availability target.

Total Recall (Bhagwan, Tati, Cheng, Savage and Voelker, "Total Recall: System Support for Automated
Availability Management", NSDI 2004) replaces a fixed replication factor by a target availability:
the system measures how often its hosts are up and derives how many copies it needs. Here the
target is ``placement.availability`` and the measurements are the candidate nodes' observed
availability fractions. With nodes assumed to fail independently, the probability that at least
one of n replicas is up (or, for a service that needs a quorum, that a majority is up) is a
Poisson binomial tail, computed exactly by dynamic programming over the n best candidates; the
count is the smallest n in ``[min_replicas, max_replicas]`` that reaches the target.

What it is not: it does not choose the nodes (:mod:`p2pdeploy.collective.allocator` does), measure
uptime, or model correlated failures (an owner's machines that go down together); spreading the
replicas over owners is how the allocator keeps the independence assumption honest. Pure: no clock,
no randomness, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from p2pdeploy.resource.manifest import Placement

#: Slack when comparing a computed availability with the target, so that three nodes up 90% do
#: meet 0.999 although the floating-point sum lands a hair below it.
TOLERANCE = 1e-12


@dataclass(frozen=True, slots=True)
class ReplicaCount:
    """The count the deployer wants, why, and the availability it expects from the best candidates."""

    count: int
    reason: str
    expected_availability: float


def up_distribution(availabilities: Sequence[float]) -> list[float]:
    """``P[k of the nodes are up]`` for k = 0..n, nodes independent (the Poisson binomial distribution)."""
    dist = [1.0]
    for p in availabilities:
        nxt = [0.0] * (len(dist) + 1)
        for k, mass in enumerate(dist):
            nxt[k] += mass * (1.0 - p)
            nxt[k + 1] += mass * p
        dist = nxt
    return dist


def service_availability(availabilities: Sequence[float], *, quorum: bool = False) -> float:
    """The probability the service is up on these nodes: at least one up, or with ``quorum`` a majority."""
    dist = up_distribution(availabilities)
    needed = len(availabilities) // 2 + 1 if quorum else 1
    return min(1.0, math.fsum(dist[needed:]))


def _clean(value: float, unknown: float) -> float:
    return value if isinstance(value, int | float) and 0.0 <= value <= 1.0 else unknown  # NaN fails both


def _percent(p: float) -> str:
    return f"{p * 100:.0f}%"


def _probability(p: float) -> str:
    return f"{p:.6g}" if p < 1 else "1"


def _on_nodes(ps: Sequence[float]) -> str:
    return f"nodes up {', '.join(_percent(p) for p in ps)}" if ps else "no nodes"


def _replicas(n: int) -> str:
    return f"{n} replica" if n == 1 else f"{n} replicas"


def replica_count(
    placement: Placement,
    availabilities: Sequence[float],
    *,
    quorum: bool = False,
    unknown_availability: float = 0.9,
) -> ReplicaCount:
    """How many replicas ``placement`` asks for, given the observed availability (0..1) of each candidate node.

    A value outside [0, 1] or NaN is a node not measured yet and counts as ``unknown_availability``.
    With ``quorum`` the service is up when a majority of its replicas is (replicated state), else
    when any one is. The expected availability is that of the best ``count`` candidates (all of
    them when there are fewer).
    """
    if not 0.0 <= unknown_availability <= 1.0:
        raise ValueError(f"unknown_availability must be between 0 and 1 (got {unknown_availability})")
    ranked = sorted((_clean(p, unknown_availability) for p in availabilities), reverse=True)

    def expected(n: int) -> float:
        return service_availability(ranked[:n], quorum=quorum)

    if placement.mode == "every":
        n = len(ranked)
        return ReplicaCount(n, f"every node that satisfies the constraints ({n})", expected(n))
    if placement.availability is None:
        n = placement.replicas if placement.replicas is not None else placement.min_replicas
        return ReplicaCount(n, f"fixed: placement.replicas = {n}", expected(n))

    target = placement.availability
    what = f"availability {target:g}" + (" (a majority up)" if quorum else "")
    low, high = placement.min_replicas, placement.max_replicas
    if len(ranked) < low:
        got = expected(low)
        return ReplicaCount(
            low,
            f"{what}: placement.min_replicas {low} but only {len(ranked)} candidate{'' if len(ranked) == 1 else 's'} "
            f"({_on_nodes(ranked)}) give {_probability(got)}",
            got,
        )
    top = min(high, len(ranked))
    best_n, best = low, -1.0
    for n in range(low, top + 1):
        got = expected(n)
        if got >= target - TOLERANCE:
            return ReplicaCount(
                n, f"{what}: {_replicas(n)} on {_on_nodes(ranked[:n])} give {_probability(got)}", got
            )
        if got > best:  # ties keep the smaller count: a replica that adds nothing is not worth running
            best_n, best = n, got
    limit = f"max_replicas {high}" if top == high else f"the {len(ranked)} candidates"
    return ReplicaCount(
        best_n, f"{what} not reachable within {limit}: {_replicas(best_n)} give {_probability(best)}", best
    )


__all__ = ["TOLERANCE", "ReplicaCount", "replica_count", "service_availability", "up_distribution"]
