"""The allocator: on which of the offered nodes a service's replicas go.

The deployer (:mod:`p2pdeploy.collective.deployer`) says how many replicas; the prospector finds
candidate nodes and reports their attributes (:func:`p2pdeploy.resource.description.node_attributes`);
the allocator picks among them. A candidate must satisfy the service's constraints and demand and
must not already host a replica of the service (or have refused it). Among those it spreads: each
pick prefers the values of the ``spread`` attributes (``owner`` first, then perhaps ``region``) that
the current hosts and the picks so far use least, because replicas on one owner's machines fail
together and availability arithmetic assumes they do not. Then it balances load (the largest free
share of the contributed cpu, then the most free service slots), and the node id breaks ties, so
the same inputs give the same placement on every node that computes it.

:func:`impossible_reason` answers the other question a deployer must answer: when nothing fits,
is it a matter of waiting (nodes are busy) or can no node of the community ever satisfy the
service (``no node offers 64 cores; the largest offers 8``)?

What it is not: it does not reserve anything (the chosen node's admission control decides), ask
the network, or move replicas that already run (self-configuration does). Greedy, not an optimal
assignment; pure and deterministic: no clock, no randomness, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.units import format_bandwidth, format_cores, format_cores_number, format_size
from p2pdeploy.resource.description import match
from p2pdeploy.resource.requirements import And, Attribute, Compare, Literal, Node, Or, Requirement


@dataclass(frozen=True, slots=True)
class Offer:
    """A candidate node: its id, where to reach it, and its attributes as the prospector reports them."""

    node_id: int
    address: Any
    attributes: Mapping[str, Any]


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _spread_value(attributes: Mapping[str, Any], name: str) -> Any:
    """The value of ``name`` as a spread key: a missing attribute is the value None, a set is a frozenset."""
    value = attributes.get(name)
    if isinstance(value, list | set | tuple | frozenset):
        try:
            return frozenset(value)
        except TypeError:
            return repr(sorted(map(repr, value)))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _free_cpu_share(attributes: Mapping[str, Any]) -> float:
    contributed = _number(attributes.get("cpu"))
    return _number(attributes.get("cpu_free")) / contributed if contributed > 0 else 0.0


def allocate(
    offers: Sequence[Offer],
    count: int,
    *,
    demand: Demand,
    constraints: Requirement | None,
    spread: Sequence[str],
    placed: Sequence[Mapping[str, Any]] = (),
    exclude: Collection[int] = (),
) -> list[Offer]:
    """Up to ``count`` of ``offers`` for new replicas, in the order chosen (fewer when not enough fit).

    ``placed`` are the attributes of the nodes that host the service now (the spread counts
    them); ``exclude`` are node ids never to choose (a replica there already, or a refusal).
    Each node is chosen at most once.
    """
    excluded = set(exclude)
    fitting: list[Offer] = []
    for offer in offers:
        if offer.node_id in excluded:
            continue
        excluded.add(offer.node_id)  # one replica per node, even if an offer is repeated
        if match(offer.attributes, constraints, demand).ok:
            fitting.append(offer)
    used = {name: Counter(_spread_value(attrs, name) for attrs in placed) for name in spread}

    def preference(offer: Offer) -> tuple[Any, ...]:
        attrs = offer.attributes
        return (
            tuple(used[name][_spread_value(attrs, name)] for name in spread),
            -_free_cpu_share(attrs),
            -_number(attrs.get("services_free")),
            offer.node_id,
        )

    chosen: list[Offer] = []
    while fitting and len(chosen) < count:
        best = min(fitting, key=preference)
        fitting.remove(best)
        chosen.append(best)
        for name in spread:
            used[name][_spread_value(best.attributes, name)] += 1
    return chosen


# -- what can never fit ---------------------------------------------------------------------

#: A free amount can never exceed what the node contributes (or the machine has): the bound to
#: compare a requirement on it with. The free amounts themselves change, so they prove nothing.
_BOUNDED_BY = {
    "cpu_free": "cpu",
    "memory_free": "memory",
    "disk_free": "disk",
    "bandwidth_free": "bandwidth",
    "services_free": "max_services",
    "machine_memory_free": "memory_total",
    "machine_disk_free": "disk_total",
}


def _amount(name: str, value: float) -> tuple[str, str]:
    """How to say ``value`` of attribute ``name``: the amount asked (with its noun) and the amount alone."""
    base = _BOUNDED_BY.get(name, name)
    if base in ("memory", "memory_total"):
        return f"{format_size(value)} of memory", format_size(value)
    if base in ("disk", "disk_total"):
        return f"{format_size(value)} of disk", format_size(value)
    if base == "bandwidth":
        return f"{format_bandwidth(value)} of bandwidth", format_bandwidth(value)
    if base == "cpu":
        return f"{format_cores(value)} of cpu", format_cores_number(value)
    if base == "cores":
        return format_cores(value), format_cores_number(value)
    if base == "max_services":
        return f"{value:g} service slot{'' if value == 1 else 's'}", f"{value:g}"
    return f"{value:g} {name}", f"{value:g}"


def _never(name: str, wanted: float, strictly: bool, largest: Mapping[str, Any]) -> str | None:
    """Why no node has ``name`` >= ``wanted`` (> with ``strictly``), or None when some node might."""
    bound_name = _BOUNDED_BY.get(name, name)
    bound = largest.get(bound_name)
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not math.isfinite(bound):
        return None
    if bound > wanted or (bound == wanted and not strictly):
        return None
    asked, _ = _amount(name, wanted)
    _, offered = _amount(name, bound)
    return f"no node offers {'more than ' if strictly else ''}{asked}; the largest offers {offered}"


_MIRRORED = {"<=": ">=", "<": ">", "==": "=="}


def _clause_reason(node: Node, largest: Mapping[str, Any]) -> str | None:
    if isinstance(node, And):
        reasons = [r for r in (_clause_reason(item, largest) for item in node.items) if r is not None]
        return "; ".join(dict.fromkeys(reasons)) or None
    if isinstance(node, Or):
        reasons = [_clause_reason(item, largest) for item in node.items]
        if all(r is not None for r in reasons):
            return "every alternative is impossible: " + "; or ".join(
                dict.fromkeys(r for r in reasons if r is not None)
            )
        return None
    if not isinstance(node, Compare):
        return None  # a negation or a bare value proves nothing about the largest node
    op, left, right = node.op, node.left, node.right
    if isinstance(left, Literal) and isinstance(right, Attribute) and op in _MIRRORED:
        op, left, right = _MIRRORED[op], right, left
    if not (isinstance(left, Attribute) and isinstance(right, Literal)) or op not in (">=", ">", "=="):
        return None
    value = right.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return _never(left.name, value, op == ">", largest)


_DEMANDED: tuple[tuple[str, Callable[[Demand], float]], ...] = (
    ("cpu", lambda d: d.cpu_cores),
    ("memory", lambda d: d.memory_bytes),
    ("disk", lambda d: d.disk_bytes),
    ("bandwidth", lambda d: d.bandwidth_bps),
)


def impossible_reason(
    constraints: Requirement | None, demand: Demand, largest: Mapping[str, Any]
) -> str | None:
    """Why no node of the community can ever run the service, or None when that is not proven.

    ``largest`` holds the largest value any node offers of each numeric attribute (``cores``,
    ``cpu``, ``memory``, ``memory_total``...); an attribute it lacks proves nothing. The demand is
    compared with the largest contribution, and each ``attr >= N`` (``>``, ``==``) clause that the
    constraints require with the largest value of the attribute (for a free amount, of what bounds
    it: ``memory_free`` with ``memory``). A clause under ``not`` proves nothing; an ``or`` is
    impossible only when every branch is.
    """
    reasons: list[str] = []
    for name, wanted in _DEMANDED:
        amount = wanted(demand)
        if amount > 0:
            reason = _never(name, amount, False, largest)
            if reason is not None:
                reasons.append(reason)
    if _never("max_services", 1, False, largest) is not None:
        reasons.append("no node offers a service slot (max_services is 0 everywhere)")
    if constraints is not None:
        reason = _clause_reason(constraints.node, largest)
        if reason is not None:
            reasons.append(reason)
    return "; ".join(dict.fromkeys(reasons)) or None


__all__ = ["Offer", "allocate", "impossible_reason"]
