"""Subtree summaries for aggregation trees: what they hold, how they merge, what they can rule out.

An aggregation tree (SDIMS, Willow) folds the attributes of every node in a subtree into one
:class:`Summary` that the subtree's root pushes to its parent. A summary counts the nodes and
keeps, per attribute name and per kind of value:

- numbers (:class:`NumberStats`): COUNT, SUM, MIN and MAX (AVG is SUM / COUNT), and a bounded
  TOP-K of ``(value, contact)`` for the attributes configured for it;
- strings (:class:`StringCounts`): how many nodes hold each value; only the ``max_distinct`` most
  common are listed, the others are *folded* into one count;
- booleans: how many nodes hold true and false;
- sets such as ``tags`` (:class:`SetCounts`): how many nodes have a set, and how many hold each
  element (bounded the same way);
- which string, boolean and set-element values occur *together on one node*: a Bloom filter of
  pairs of facets (:func:`facet_pairs`, 256 bytes). Per-attribute counts cannot tell a subtree
  with a freebsd node and a riscv64 node from one with a freebsd riscv64 node; the pairs can,
  which is what keeps a search for a rare combination from visiting every subtree.

Merging is associative and commutative, so a parent's summary is its own attributes merged with
its children's whatever the shape of the tree; COUNT, SUM, MIN and MAX are exact, folding and
TOP-K are the bounded parts. A summary whose attribute names outgrew ``max_attributes`` keeps
the most widely held ones and says it is ``truncated``.

:func:`possible` is the pruning test of a Cone-style descent, for the whole requirements
language (:mod:`p2pdeploy.resource.requirements`): a three-valued evaluation over a summary that
answers "how many nodes of this subtree may satisfy the requirement (0: none), and may some fail
it". It is sound: the count is never below the true number of matches, so a subtree that holds
a match is never ruled out (tests check it against direct evaluation, exhaustively on a small
domain). The counts rank subtrees for the descent; TOP-K tightens them for ``>=`` and ``>``. Values are compared with the evaluator's rules: a missing attribute or a value of
another kind makes a comparison false, and ``!=`` is not the negation of ``==``.

Not here: the protocol that moves summaries (:mod:`p2pdeploy.collective.prospector`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.requirements import And, Attribute, Compare, Literal, Node, Not, Or, Requirement
from p2pdeploy.wire import record

#: An attribute value as it travels: sets become sorted lists.
WireValue = bool | int | float | str | list[bool | int | float | str]

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
MAX_NAME_CHARS = 64
MAX_STRING_CHARS = 256
MAX_SET_ITEMS = 64
MAX_ATTRIBUTES = 64
#: Bounds on what a peer may send, whatever our own limits (we re-fold to ours when merging).
MAX_WIRE_ENTRIES = 256
MAX_WIRE_TOP = 64
MAX_NODES = 1 << 40


@dataclass(frozen=True, slots=True)
class Limits:
    """How large a summary may grow (see :class:`~p2pdeploy.collective.prospector.ProspectorConfig`)."""

    max_distinct: int = 16
    max_attributes: int = 64
    top_k: int = 3
    top_attributes: frozenset[str] = frozenset({"memory_free", "cpu_free", "disk_free"})


# -- the records ----------------------------------------------------------------------------


@record
class TopEntry:
    value: int | float
    contact: Contact


@record
class NumberStats:
    """A numeric attribute over the nodes of a subtree where it is a number."""

    count: int
    total: int | float
    low: int | float
    high: int | float
    #: The highest values with their nodes, highest first (only for ``Limits.top_attributes``).
    top: list[TopEntry] = field(default_factory=list)

    @property
    def average(self) -> float:
        return self.total / self.count


@record
class StringCounts:
    """Value -> nodes, for the most common values; ``folded`` nodes hold values not listed."""

    counts: dict[str, int]
    folded: int = 0

    @property
    def nodes(self) -> int:
        return sum(self.counts.values()) + self.folded


@record
class SetCounts:
    """``count`` nodes have a set; element -> nodes whose set holds it (a lower bound once
    anything was folded); ``folded`` nodes hold an element that is not listed (folded, or not a string)."""

    count: int
    elements: dict[str, int]
    folded: int = 0


@record
class Summary:
    """A subtree: how many nodes, and each attribute's statistics by kind of value."""

    nodes: int
    numbers: dict[str, NumberStats] = field(default_factory=dict)
    strings: dict[str, StringCounts] = field(default_factory=dict)
    #: name -> (nodes where it is true, nodes where it is false)
    booleans: dict[str, tuple[int, int]] = field(default_factory=dict)
    sets: dict[str, SetCounts] = field(default_factory=dict)
    #: Some attribute names were dropped (``max_attributes``): an unlisted one is unknown, not absent.
    truncated: bool = False
    #: A Bloom filter of the pairs of facets (``os == "freebsd"``, ``"ssd" in tags``) that occur
    #: together on one node of the subtree (:func:`facet_pairs`); ``None``: unknown.
    pairs: bytes | None = None

    def names(self) -> set[str]:
        return set(self.numbers) | set(self.strings) | set(self.booleans) | set(self.sets)

    def holders(self, name: str) -> int:
        """Nodes that have attribute ``name``, of any kind."""
        count = 0
        if name in self.numbers:
            count += self.numbers[name].count
        if name in self.strings:
            count += self.strings[name].nodes
        if name in self.booleans:
            count += sum(self.booleans[name])
        if name in self.sets:
            count += self.sets[name].count
        return count

    def knows(self, name: str) -> bool:
        """False when what the summary says of ``name`` may be incomplete: in a truncated
        summary any attribute may have been dropped for some of the nodes."""
        return not self.truncated


EMPTY = Summary(0)


# -- attributes -----------------------------------------------------------------------------


def normalize_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A node's attributes checked and in their canonical form (sets become frozensets).

    Raises :class:`ValueError` naming the attribute that is not publishable: names follow the
    requirements language, values are booleans, finite numbers, strings or sets of those.
    """
    if not isinstance(attributes, Mapping):
        raise TypeError(f"attributes are a mapping of name to value (got {type(attributes).__name__})")
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        problem = _attribute_problem(name, value)
        if problem is not None:
            raise ValueError(f"attribute {name!r}: {problem}")
        out[name] = frozenset(value) if isinstance(value, set | frozenset | list | tuple) else value
    if len(out) > MAX_ATTRIBUTES:
        raise ValueError(f"a node publishes at most {MAX_ATTRIBUTES} attributes (got {len(out)})")
    return out


def _attribute_problem(name: Any, value: Any) -> str | None:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not NAME_RE.fullmatch(name):
        return f"a name is a letter or _ then letters, digits, _ or . (at most {MAX_NAME_CHARS} characters)"
    if isinstance(value, set | frozenset | list | tuple):
        if len(value) > MAX_SET_ITEMS:
            return f"a set holds at most {MAX_SET_ITEMS} items (got {len(value)})"
        for item in value:
            problem = _scalar_problem(item)
            if problem is not None:
                return f"set item {item!r}: {problem}"
        return None
    return _scalar_problem(value)


def _scalar_problem(value: Any) -> str | None:
    kind = type(value)
    if kind is bool:
        return None
    if kind is int:
        return None if -(1 << 63) <= value < (1 << 63) else "integers must fit in 64 bits"
    if kind is float:
        return None if math.isfinite(value) else "numbers must be finite"
    if kind is str:
        return None if len(value) <= MAX_STRING_CHARS else f"strings are at most {MAX_STRING_CHARS} characters"
    return f"expected a boolean, number, string or set of those (got {kind.__name__})"


def attributes_to_wire(attributes: Mapping[str, Any]) -> dict[str, WireValue]:
    """Normalized attributes as they travel (sets as sorted lists)."""
    return {
        name: sorted(value, key=_set_order) if isinstance(value, frozenset) else value
        for name, value in attributes.items()
    }


def attributes_from_wire(attributes: Any) -> dict[str, Any] | None:
    """A peer's attributes in canonical form, or ``None`` when they break the rules."""
    if not isinstance(attributes, dict) or len(attributes) > MAX_ATTRIBUTES:
        return None
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        if _attribute_problem(name, value) is not None:
            return None
        out[name] = frozenset(value) if isinstance(value, list) else value
    return out


def _set_order(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value)


# -- building and merging -------------------------------------------------------------------


def summarise(attributes: Mapping[str, Any], contact: Contact, limits: Limits) -> Summary:
    """The summary of one node (its normalized attributes)."""
    names = sorted(attributes)
    truncated = len(names) > limits.max_attributes
    numbers: dict[str, NumberStats] = {}
    strings: dict[str, StringCounts] = {}
    booleans: dict[str, tuple[int, int]] = {}
    sets: dict[str, SetCounts] = {}
    for name in names[: limits.max_attributes]:
        value = attributes[name]
        kind = type(value)
        if kind is bool:
            booleans[name] = (1, 0) if value else (0, 1)
        elif kind is int or kind is float:
            top = [TopEntry(value, contact)] if limits.top_k > 0 and name in limits.top_attributes else []
            numbers[name] = NumberStats(1, value, value, value, top)
        elif kind is str:
            strings[name] = StringCounts({value: 1})
        else:
            listed = sorted(item for item in value if type(item) is str)
            folded = len(listed) < len(value) or len(listed) > limits.max_distinct
            sets[name] = SetCounts(1, {item: 1 for item in listed[: limits.max_distinct]}, int(folded))
    return Summary(1, numbers, strings, booleans, sets, truncated, facet_pairs(attributes))


def merge(parts: Iterable[Summary], limits: Limits) -> Summary:
    """One summary for the union of the subtrees ``parts`` describe."""
    parts = [part for part in parts if part.nodes]
    if len(parts) == 1 and _within(parts[0], limits):
        return parts[0]
    nodes = sum(part.nodes for part in parts)
    truncated = any(part.truncated for part in parts)
    numbers = _merge_maps([part.numbers for part in parts], lambda group: _merge_numbers(group, limits.top_k))
    strings = _merge_maps([part.strings for part in parts], lambda group: _merge_strings(group, limits.max_distinct))
    booleans = _merge_maps([part.booleans for part in parts], _merge_booleans)
    sets = _merge_maps([part.sets for part in parts], lambda group: _merge_sets(group, limits.max_distinct))
    pairs = _merge_pairs([part.pairs for part in parts])
    merged = Summary(nodes, numbers, strings, booleans, sets, truncated, pairs)
    names = merged.names()
    if len(names) <= limits.max_attributes:
        return merged
    keep = set(sorted(names, key=lambda name: (-merged.holders(name), name))[: limits.max_attributes])
    return Summary(
        nodes,
        {name: v for name, v in numbers.items() if name in keep},
        {name: v for name, v in strings.items() if name in keep},
        {name: v for name, v in booleans.items() if name in keep},
        {name: v for name, v in sets.items() if name in keep},
        truncated=True,
        pairs=pairs,
    )


# -- pairs of facets: which values occur together on one node --------------------------------

#: Bits of the pair filter, and how many facets of a node are paired (more: the filter is full).
PAIR_FILTER_BITS = 2048
PAIR_FILTER_BYTES = PAIR_FILTER_BITS // 8
MAX_PAIRED_FACETS = 32
_FULL = (1 << PAIR_FILTER_BITS) - 1


def facets(attributes: Mapping[str, Any]) -> list[str]:
    """A node's equality facets: its string and boolean values and the strings in its sets."""
    out = []
    for name in sorted(attributes):
        value = attributes[name]
        kind = type(value)
        if kind is str:
            out.append(f"{name}=s:{value}")
        elif kind is bool:
            out.append(f"{name}=b:{int(value)}")
        elif kind is frozenset:
            out.extend(f"{name}>s:{item}" for item in sorted(item for item in value if type(item) is str))
    return out


def _pair_bits(a: str, b: str) -> int:
    first, second = (a, b) if a < b else (b, a)
    digest = int.from_bytes(hashlib.blake2b(f"{first}\0{second}".encode(), digest_size=8).digest(), "big")
    return (1 << (digest % PAIR_FILTER_BITS)) | (1 << ((digest >> 32) % PAIR_FILTER_BITS))


def facet_pairs(attributes: Mapping[str, Any]) -> bytes:
    """The pair filter of one node: every two of its facets (an exact test for a single node,
    a Bloom filter once merged: a pair it lacks occurs on no node of the subtree)."""
    node_facets = facets(attributes)
    if len(node_facets) > MAX_PAIRED_FACETS:
        return _FULL.to_bytes(PAIR_FILTER_BYTES, "big")
    bits = 0
    for i, a in enumerate(node_facets):
        for b in node_facets[i + 1 :]:
            bits |= _pair_bits(a, b)
    return bits.to_bytes(PAIR_FILTER_BYTES, "big")


def _merge_pairs(filters: Sequence[bytes | None]) -> bytes | None:
    bits = 0
    for pairs in filters:
        if pairs is None:
            return None  # a part that does not say: no pair can be ruled out
        bits |= int.from_bytes(pairs, "big")
    return bits.to_bytes(PAIR_FILTER_BYTES, "big")


def _pairs_absent(summary: Summary, wanted: list[str]) -> bool:
    """True when two of the ``wanted`` facets never occur together on one node of the subtree."""
    wanted = sorted(set(wanted))  # a clause said twice is one facet, not a pair
    if summary.pairs is None or len(wanted) < 2:
        return False
    bits = int.from_bytes(summary.pairs, "big")
    for i, a in enumerate(wanted):
        for b in wanted[i + 1 :]:
            needed = _pair_bits(a, b)
            if bits & needed != needed:
                return True
    return False


def _facet_of(node: Node) -> str | None:
    """The facet a clause requires of a node that satisfies it (``os == "x"``, ``"x" in tags``)."""
    if not isinstance(node, Compare):
        return None
    left, right, op = node.left, node.right, node.op
    if op == "==" and isinstance(left, Literal) and isinstance(right, Attribute):
        left, right = right, left
    if op == "==" and isinstance(left, Attribute) and isinstance(right, Literal):
        if type(right.value) is str:
            return f"{left.name}=s:{right.value}"
        if type(right.value) is bool:
            return f"{left.name}=b:{int(right.value)}"
    if op == "in" and isinstance(left, Literal) and isinstance(right, Attribute) and type(left.value) is str:
        return f"{right.name}>s:{left.value}"
    return None


def _merge_maps(maps: Sequence[dict[str, Any]], combine: Any) -> dict[str, Any]:
    groups: dict[str, list[Any]] = {}
    for mapping in maps:
        for name, value in mapping.items():
            group = groups.get(name)
            if group is None:
                groups[name] = [value]
            else:
                group.append(value)
    return {name: group[0] if len(group) == 1 else combine(group) for name, group in sorted(groups.items())}


def _merge_numbers(group: list[NumberStats], top_k: int) -> NumberStats:
    top: list[TopEntry] = []
    complete = True  # every part lists its own k highest values, so the merged list is the k highest
    for stats in group:
        top.extend(stats.top)
        complete = complete and len(stats.top) >= min(stats.count, top_k)
    return NumberStats(
        sum(stats.count for stats in group),
        sum(stats.total for stats in group),
        min(stats.low for stats in group),
        max(stats.high for stats in group),
        best_entries(top, top_k) if top and complete else [],
    )


def _merge_strings(group: list[StringCounts], max_distinct: int) -> StringCounts:
    counts: Counter[str] = Counter()
    folded = 0
    for part in group:
        counts.update(part.counts)
        folded += part.folded
    listed, more = _fold(counts, max_distinct)
    return StringCounts(listed, folded + more)


def _merge_booleans(group: list[tuple[int, int]]) -> tuple[int, int]:
    return (sum(trues for trues, _ in group), sum(falses for _, falses in group))


def _merge_sets(group: list[SetCounts], max_distinct: int) -> SetCounts:
    elements: Counter[str] = Counter()
    count = folded = 0
    for part in group:
        count += part.count
        elements.update(part.elements)
        folded += part.folded
    listed, more = _fold(elements, max_distinct)
    return SetCounts(count, listed, folded + more)


def subtract(summary: Summary, parts: Iterable[Summary]) -> Summary:
    """``summary`` without the subtrees ``parts`` (which it counted): the entry of a dead node
    whose children re-attached elsewhere. Counts and sums are subtracted (never below zero);
    MIN, MAX and TOP-K stay as they were, which only makes them looser bounds."""
    parts = list(parts)
    nodes = summary.nodes - sum(part.nodes for part in parts)
    if nodes <= 0:
        return EMPTY
    numbers: dict[str, NumberStats] = {}
    for name, stats in summary.numbers.items():
        gone = [part.numbers[name] for part in parts if name in part.numbers]
        count = stats.count - sum(g.count for g in gone)
        if count > 0:
            numbers[name] = NumberStats(count, stats.total - sum(g.total for g in gone), stats.low, stats.high,
                                        stats.top)
    strings: dict[str, StringCounts] = {}
    for name, counts in summary.strings.items():
        left = Counter(counts.counts)
        folded = counts.folded
        for part in parts:
            if name in part.strings:
                left.subtract(part.strings[name].counts)
                folded -= part.strings[name].folded
        remaining = StringCounts({k: v for k, v in sorted(left.items()) if v > 0}, max(0, folded))
        if remaining.nodes:
            strings[name] = remaining
    booleans: dict[str, tuple[int, int]] = {}
    for name, (trues, falses) in summary.booleans.items():
        for part in parts:
            if name in part.booleans:
                trues -= part.booleans[name][0]
                falses -= part.booleans[name][1]
        if trues > 0 or falses > 0:
            booleans[name] = (max(0, trues), max(0, falses))
    sets: dict[str, SetCounts] = {}
    for name, set_counts in summary.sets.items():
        count, folded = set_counts.count, set_counts.folded
        elements = Counter(set_counts.elements)
        for part in parts:
            if name in part.sets:
                count -= part.sets[name].count
                folded -= part.sets[name].folded
                elements.subtract(part.sets[name].elements)
        if count > 0:
            sets[name] = SetCounts(count, {k: v for k, v in sorted(elements.items()) if v > 0}, max(0, folded))
    return Summary(nodes, numbers, strings, booleans, sets, summary.truncated, summary.pairs)


def _within(summary: Summary, limits: Limits) -> bool:
    """A summary already inside our bounds (a peer's may have been built with larger ones)."""
    return (
        len(summary.names()) <= limits.max_attributes
        and all(len(s.counts) <= limits.max_distinct for s in summary.strings.values())
        and all(len(s.elements) <= limits.max_distinct for s in summary.sets.values())
        and all(len(n.top) <= limits.top_k for n in summary.numbers.values())
    )


def _fold(counts: Counter[str], max_distinct: int) -> tuple[dict[str, int], int]:
    """Keep the ``max_distinct`` most common keys (ties by key); the rest become one count."""
    if len(counts) <= max_distinct:
        return dict(sorted(counts.items())), 0
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return dict(sorted(ranked[:max_distinct])), sum(count for _, count in ranked[max_distinct:])


def best_entries(entries: Iterable[TopEntry], k: int) -> list[TopEntry]:
    """The ``k`` highest values, one per node (highest first, ties by node id)."""
    best: dict[int, TopEntry] = {}
    for entry in entries:
        seen = best.get(entry.contact.node_id)
        if seen is None or entry.value > seen.value:
            best[entry.contact.node_id] = entry
    return sorted(best.values(), key=lambda e: (-e.value, e.contact.node_id))[:k]


# -- checking a peer's summary --------------------------------------------------------------


def summary_problem(summary: Any) -> str | None:
    """Why a summary received from a peer cannot be used (``None`` when it can)."""
    if not isinstance(summary, Summary):
        return "not a summary"
    if not 1 <= summary.nodes <= MAX_NODES:
        return f"nodes must be between 1 and {MAX_NODES}"
    tables = (summary.numbers, summary.strings, summary.booleans, summary.sets)
    if sum(len(table) for table in tables) > MAX_WIRE_ENTRIES:
        return "too many attributes"
    for table in tables:
        for name in table:
            if len(name) > MAX_NAME_CHARS or not NAME_RE.fullmatch(name):
                return f"bad attribute name {name[:MAX_NAME_CHARS]!r}"
    for name, stats in summary.numbers.items():
        if not 1 <= stats.count <= MAX_NODES:
            return f"{name}: count out of range"
        if not (math.isfinite(stats.total) and math.isfinite(stats.low) and math.isfinite(stats.high)):
            return f"{name}: numbers must be finite"
        if stats.low > stats.high:
            return f"{name}: low is above high"
        if len(stats.top) > MAX_WIRE_TOP or not all(math.isfinite(entry.value) for entry in stats.top):
            return f"{name}: bad top entries"
    for name, counts in summary.strings.items():
        if not _counts_ok(counts.counts) or not 0 <= counts.folded <= MAX_NODES:
            return f"{name}: bad value counts"
    for name, (trues, falses) in summary.booleans.items():
        if not (0 <= trues <= MAX_NODES and 0 <= falses <= MAX_NODES):
            return f"{name}: bad boolean counts"
    for name, set_counts in summary.sets.items():
        if not (_counts_ok(set_counts.elements) and 0 <= set_counts.count <= MAX_NODES
                and 0 <= set_counts.folded <= MAX_NODES):
            return f"{name}: bad element counts"
    if summary.pairs is not None and len(summary.pairs) != PAIR_FILTER_BYTES:
        return f"the pair filter must be {PAIR_FILTER_BYTES} bytes"
    return None


def _counts_ok(counts: dict[str, int]) -> bool:
    if len(counts) > MAX_WIRE_ENTRIES:
        return False
    return all(len(key) <= MAX_STRING_CHARS and 0 <= count <= MAX_NODES for key, count in counts.items())


# -- pruning: may a subtree hold a match? ----------------------------------------------------

#: ``(holders, may_fail)``: at most ``holders`` nodes of the subtree satisfy the clause (0: none
#: can, the subtree is pruned); ``may_fail``: some node may not satisfy it.
Possible = tuple[int, bool]
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_NO_STRINGS = StringCounts({})


def may_match(requirement: Requirement | Node, summary: Summary) -> bool:
    """False only when no node of the summarised subtree can satisfy ``requirement``."""
    return match_bound(requirement, summary) > 0


def match_bound(requirement: Requirement | Node, summary: Summary) -> int:
    """An upper bound on how many nodes of the subtree satisfy ``requirement`` (0: none can).
    A descent visits the subtrees with the highest bounds first."""
    node = requirement.node if isinstance(requirement, Requirement) else requirement
    return possible(node, summary)[0]


def possible(node: Node, summary: Summary) -> Possible:
    """Three-valued evaluation of a requirement over a subtree, with counts (see the module docstring)."""
    nodes = summary.nodes
    if nodes <= 0:
        return (0, False)
    if isinstance(node, And):
        results = [possible(item, summary) for item in node.items]
        may_fail = any(r[1] for r in results)
        required = [facet for facet in map(_facet_of, node.items) if facet is not None]
        if _pairs_absent(summary, required):  # each value occurs, but never together on one node
            return (0, may_fail)
        return (min(r[0] for r in results), may_fail)
    if isinstance(node, Or):
        results = [possible(item, summary) for item in node.items]
        return (min(nodes, sum(r[0] for r in results)), all(r[1] for r in results))
    if isinstance(node, Not):
        holders, may_fail = possible(node.item, summary)
        return (nodes if may_fail else 0, holders > 0)
    if isinstance(node, Literal):
        return _constant(node, nodes)
    if isinstance(node, Attribute):  # a bare name holds where it is the boolean true
        if not summary.knows(node.name):
            return (nodes, True)
        trues = summary.booleans.get(node.name, (0, 0))[0]
        return (trues, nodes - trues > 0)
    assert isinstance(node, Compare)
    left, right = node.left, node.right
    if isinstance(left, Literal) and isinstance(right, Literal):
        return _constant(node, nodes)
    if isinstance(left, Attribute) and isinstance(right, Literal):
        if not summary.knows(left.name):
            return (nodes, True)
        if node.op in ("in", "not in"):
            return _value_in(summary, left.name, right.value, node.op == "in")
        return _compare(summary, left.name, node.op, right.value)
    if isinstance(left, Literal) and isinstance(right, Attribute):
        if not summary.knows(right.name):
            return (nodes, True)
        if node.op in ("in", "not in"):
            return _element_in(summary, right.name, left.value, node.op == "in")
        return _compare(summary, right.name, _FLIPPED[node.op], left.value)
    return (nodes, True)  # two attributes, or a nested expression as an operand


def _constant(node: Node, nodes: int) -> Possible:
    value = Requirement(node).evaluate({})
    return (nodes if value else 0, not value)


def _compare(summary: Summary, name: str, op: str, c: Any) -> Possible:
    """``attribute OP c`` for ``==``, ``!=`` and the order comparisons."""
    nodes = summary.nodes
    kind = type(c)
    if kind is int or kind is float:
        stats = summary.numbers.get(name)
        if stats is None:
            return (0, True)
        low, high, count = stats.low, stats.high, stats.count
        others = nodes - count > 0  # missing, or of another kind: every comparison is false
        single = low == high
        if op == "==":
            return (count if low <= c <= high else 0, others or not (single and low == c))
        if op == "!=":
            return (0 if single and low == c else count, others or low <= c <= high)
        if op == ">=":
            return (_above(stats, c, True), others or low < c)
        if op == ">":
            return (_above(stats, c, False), others or low <= c)
        if op == "<=":
            return (count if low <= c else 0, others or high > c)
        return (count if low < c else 0, others or high >= c)  # "<"
    if op not in ("==", "!="):
        return (0, True)  # order comparisons hold for numbers only
    if kind is bool:
        trues, falses = summary.booleans.get(name, (0, 0))
        same, other = (trues, falses) if c else (falses, trues)
        if op == "==":
            return (same, nodes - same > 0)
        return (other, nodes - other > 0)
    if kind is str:
        strings = summary.strings.get(name, _NO_STRINGS)
        listed = strings.counts.get(c, 0)
        if op == "==":
            return (listed + strings.folded, nodes - listed > 0)
        string_nodes = strings.nodes
        return (string_nodes - listed, nodes - string_nodes > 0 or listed > 0 or strings.folded > 0)
    if kind is frozenset:  # only a set can equal a set
        sets = summary.sets.get(name)
        if sets is None:
            return (0, True)
        if op == "==":
            return (sets.count if _elements_may_hold(sets, c) else 0, True)
        return (sets.count, True)
    return (nodes, True)


def _above(stats: NumberStats, c: int | float, inclusive: bool) -> int:
    """How many values may be >= c (or > c): TOP-K holds the highest values, so when its lowest
    entry is below c, only its entries can be (Cone's use of the maximum, with k of them)."""
    def passes(value: int | float) -> bool:
        return value >= c if inclusive else value > c

    if not passes(stats.high):
        return 0
    top = stats.top
    if top and not passes(min(entry.value for entry in top)):
        return sum(1 for entry in top if passes(entry.value))
    return stats.count


def _elements_may_hold(sets: SetCounts, items: frozenset) -> bool:
    """Some set in the subtree may hold every one of ``items``."""
    return all((type(item) is str and sets.elements.get(item, 0) > 0) or sets.folded > 0 for item in items)


def _value_in(summary: Summary, name: str, c: Any, positive: bool) -> Possible:
    """``attribute in c`` / ``attribute not in c``: the attribute is a scalar, ``c`` a set literal."""
    if type(c) is not frozenset:
        return (0, True)
    inside = 0  # how many scalar values may be in c
    outside = 0  # how many scalar values may not be in c
    scalars = 0
    stats = summary.numbers.get(name)
    if stats is not None:
        scalars += stats.count
        # bools are numbers to Python's `in` (1 in {True}), and so to the evaluator
        if any(isinstance(v, int | float) and stats.low <= v <= stats.high for v in c):
            inside += stats.count
        if not (stats.low == stats.high and stats.low in c):
            outside += stats.count
    strings = summary.strings.get(name)
    if strings is not None:
        scalars += strings.nodes
        inside += sum(strings.counts.get(v, 0) for v in c if type(v) is str)
        if strings.folded and any(type(v) is str for v in c):
            inside += strings.folded
        outside += strings.folded + sum(n for s, n in strings.counts.items() if s not in c)
    trues, falses = summary.booleans.get(name, (0, 0))
    scalars += trues + falses
    inside += (trues if True in c else 0) + (falses if False in c else 0)
    outside += (trues if True not in c else 0) + (falses if False not in c else 0)
    neither = summary.nodes - scalars > 0  # missing, or a set: both `in` and `not in` are false
    if positive:
        return (inside, neither or outside > 0)
    return (outside, neither or inside > 0)


def _element_in(summary: Summary, name: str, c: Any, positive: bool) -> Possible:
    """``c in attribute`` / ``c not in attribute``: the attribute is a set, ``c`` a scalar literal."""
    sets = summary.sets.get(name)
    if type(c) is frozenset or sets is None:
        return (0, True)
    listed = sets.elements.get(c, 0) if type(c) is str else 0
    may_hold = min(sets.count, listed + sets.folded)  # sets that may hold c
    if positive:
        return (may_hold, summary.nodes - listed > 0)
    return (sets.count - listed, summary.nodes - sets.count > 0 or may_hold > 0)


__all__ = [
    "EMPTY",
    "Limits",
    "NumberStats",
    "SetCounts",
    "StringCounts",
    "Summary",
    "TopEntry",
    "attributes_from_wire",
    "attributes_to_wire",
    "best_entries",
    "facet_pairs",
    "facets",
    "match_bound",
    "may_match",
    "merge",
    "normalize_attributes",
    "possible",
    "subtract",
    "summarise",
    "summary_problem",
]
