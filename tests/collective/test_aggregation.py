"""Subtree summaries: merging is exact where it must be, bounded where it may be, and the
pruning test never rules out a subtree that holds a match."""

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.collective.aggregation import (
    Limits,
    NumberStats,
    StringCounts,
    Summary,
    TopEntry,
    attributes_from_wire,
    attributes_to_wire,
    match_bound,
    may_match,
    merge,
    normalize_attributes,
    possible,
    subtract,
    summarise,
    summary_problem,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.requirements import And, Attribute, Compare, Literal, Node, Not, Or, Requirement

LIMITS = Limits(max_distinct=16, top_k=3, top_attributes=frozenset({"memory_free"}))
TINY = Limits(max_distinct=2, max_attributes=4, top_k=2, top_attributes=frozenset({"memory_free", "cpu"}))


def contact(i: int) -> Contact:
    return Contact(i + 1, i)


# -- strategies -----------------------------------------------------------------------------

# Small pools, shared by values and literals, so comparisons often meet their boundary cases.
NAMES = ("cpu", "os", "tags", "gpu", "mixed")
NUMBERS = (0, 1, 2, 3, 1.5, -1)
STRINGS = ("linux", "darwin", "alice", "")
ELEMENTS = ("ssd", "gpu", "linux")
numbers = st.sampled_from(NUMBERS)
scalars = st.one_of(numbers, st.sampled_from(STRINGS), st.booleans())
sets = st.frozensets(st.one_of(st.sampled_from(ELEMENTS), st.sampled_from((0, 1)), st.booleans()), max_size=3)
values = st.one_of(scalars, sets)
attribute_maps = st.dictionaries(st.sampled_from(NAMES), values, max_size=len(NAMES))
literals = st.one_of(
    numbers.map(Literal), st.sampled_from(STRINGS + ELEMENTS).map(Literal), st.booleans().map(Literal),
    st.frozensets(st.one_of(st.sampled_from(STRINGS + ELEMENTS), numbers, st.booleans()), max_size=3)
    .map(Literal),
)
attributes = st.sampled_from(NAMES).map(Attribute)
ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in"])
comparisons = st.one_of(
    st.builds(Compare, ops, attributes, literals),
    st.builds(Compare, ops, literals, attributes),
    st.builds(Compare, ops, literals, literals),
    st.builds(Compare, ops, attributes, attributes),
)
leaves = st.one_of(comparisons, attributes, literals)
requirements: st.SearchStrategy[Node] = st.one_of(
    comparisons,
    st.recursive(
        leaves,
        lambda inner: st.one_of(
            inner.map(Not),
            st.lists(inner, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
            st.lists(inner, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
        ),
        max_leaves=5,
    ),
)


def merged_randomly(summaries: list[Summary], limits: Limits, seed: int) -> Summary:
    """Merge in a random tree shape, as an aggregation tree would."""
    rng = random.Random(seed)
    parts = list(summaries)
    while len(parts) > 1:
        take = rng.randint(2, min(4, len(parts)))
        rng.shuffle(parts)
        parts = [merge(parts[:take], limits), *parts[take:]]
    return parts[0]


# -- exact aggregates -----------------------------------------------------------------------


@given(
    st.lists(st.dictionaries(st.sampled_from(["cpu", "memory_free", "os"]),
                             st.one_of(st.integers(0, 10**12), st.sampled_from(["linux", "darwin"]))), min_size=1,
             max_size=40),
    st.integers(0, 2**32),
)
def test_aggregation_of_random_trees_equals_the_direct_count_sum_min_max(nodes, seed):
    summaries = [summarise(normalize_attributes(a), contact(i), LIMITS) for i, a in enumerate(nodes)]
    root = merged_randomly(summaries, LIMITS, seed)
    assert root.nodes == len(nodes)
    for name in ("cpu", "memory_free"):
        values = [a[name] for a in nodes if isinstance(a.get(name), int)]
        stats = root.numbers.get(name)
        if not values:
            assert stats is None
            continue
        assert (stats.count, stats.total, stats.low, stats.high) == (len(values), sum(values), min(values),
                                                                      max(values))
        assert stats.average == sum(values) / len(values)
    oses = [a["os"] for a in nodes if isinstance(a.get("os"), str)]
    if oses:
        assert root.strings["os"].counts == {v: oses.count(v) for v in set(oses)}
    assert root.holders("memory_free") == sum(1 for a in nodes if "memory_free" in a)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=30), st.integers(0, 2**32))
def test_top_k_holds_the_k_highest_values_with_their_nodes(values, seed):
    summaries = [summarise({"memory_free": v}, contact(i), LIMITS) for i, v in enumerate(values)]
    top = merged_randomly(summaries, LIMITS, seed).numbers["memory_free"].top
    expected = sorted(((-v, i + 1) for i, v in enumerate(values)))[: LIMITS.top_k]
    assert [(-e.value, e.contact.node_id) for e in top] == expected


@given(st.lists(attribute_maps, min_size=1, max_size=25), st.integers(0, 2**32), st.integers(0, 2**32))
def test_merging_does_not_depend_on_the_shape_of_the_tree(nodes, seed_a, seed_b):
    summaries = [summarise(normalize_attributes(a), contact(i), LIMITS) for i, a in enumerate(nodes)]
    a = merged_randomly(summaries, LIMITS, seed_a)
    b = merged_randomly(summaries, LIMITS, seed_b)
    assert a.nodes == b.nodes
    for name in a.numbers:  # float sums may differ in the last bit, counts and bounds may not
        x, y = a.numbers[name], b.numbers[name]
        assert (x.count, x.low, x.high, x.top) == (y.count, y.low, y.high, y.top)
        assert math.isclose(x.total, y.total, abs_tol=1e-9)
    assert (a.strings, a.booleans, a.sets) == (b.strings, b.booleans, b.sets)


def test_rare_strings_fold_into_one_count_and_the_total_is_kept():
    owners = ["a"] * 5 + ["b"] * 3 + ["c", "d", "e"]
    root = merge([summarise({"owner": o}, contact(i), TINY) for i, o in enumerate(owners)], TINY)
    counts = root.strings["owner"]
    assert counts.counts == {"a": 5, "b": 3}
    assert counts.folded == 3 and counts.nodes == len(owners)


def test_too_many_attribute_names_keep_the_most_held_and_say_truncated():
    nodes = [{"a": 1, "b": 1}, {"a": 1, "c": 1}, {"a": 1, "b": 1, "d": 1, "e": 1, "f": 1}]
    root = merge([summarise(n, contact(i), TINY) for i, n in enumerate(nodes)], TINY)
    assert root.truncated
    assert set(root.numbers) >= {"a", "b"} and len(root.names()) == TINY.max_attributes
    assert may_match(Requirement.parse("f >= 1"), root)  # dropped names are unknown, not absent
    assert may_match(Requirement.parse("a >= 5"), root)  # and nothing is pruned on a truncated summary


@given(st.lists(st.dictionaries(st.sampled_from(["cpu", "os", "tags", "gpu"]),
                                st.one_of(st.integers(0, 9), st.sampled_from(["x", "y"]), st.booleans(),
                                          st.frozensets(st.sampled_from(ELEMENTS), max_size=2))),
                min_size=2, max_size=20), st.integers(1, 19))
def test_subtracting_a_re_attached_subtree_restores_the_counts_of_the_rest(nodes, split):
    split = min(split, len(nodes) - 1)
    summaries = [summarise(normalize_attributes(a), contact(i), LIMITS) for i, a in enumerate(nodes)]
    rest, moved = merge(summaries[:split], LIMITS), merge(summaries[split:], LIMITS)
    left = subtract(merge([rest, moved], LIMITS), [moved])
    assert left.nodes == rest.nodes
    assert {n: (s.count, s.total) for n, s in left.numbers.items()} == {
        n: (s.count, s.total) for n, s in rest.numbers.items()}
    assert left.strings == rest.strings and left.booleans == rest.booleans
    assert {n: (s.count, s.elements) for n, s in left.sets.items()} == {
        n: (s.count, s.elements) for n, s in rest.sets.items()}


def test_subtracting_everything_leaves_an_empty_summary():
    one = summarise({"cpu": 2}, contact(0), LIMITS)
    assert subtract(one, [one]).nodes == 0


# -- pruning is sound -----------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(attribute_maps, min_size=1, max_size=6), requirements, st.integers(0, 2**32))
def test_pruning_never_counts_fewer_matches_than_a_subtree_holds(nodes, node, seed):
    requirement = Requirement(node)
    normalized = [normalize_attributes(a) for a in nodes]
    for limits in (LIMITS, TINY):
        summary = merged_randomly([summarise(a, contact(i), limits) for i, a in enumerate(normalized)], limits,
                                  seed)
        holders, may_fail = possible(node, summary)
        results = [requirement.evaluate(a) for a in normalized]
        assert holders >= sum(results), (str(requirement), normalized)
        if not all(results):
            assert may_fail, (str(requirement), normalized)


FOLDING = Limits(max_distinct=1, top_k=1, top_attributes=frozenset({"v"}))
#: One attribute's values on up to three nodes (None: the node lacks it), and literals to compare them with.
POOL = (None, "a", "b", "c", 0, 1, 1.5, True, frozenset({"x"}), frozenset({"x", "y", 1}))
POOL_LITERALS = ("a", "b", "x", 0, 1, 2, 1.5, True, False, frozenset({"a"}), frozenset({"a", "b"}),
                 frozenset({"x"}), frozenset({0, 1}), frozenset({True}), frozenset())


def test_every_clause_on_one_attribute_is_sound_even_when_values_fold():
    """Exhaustive over a small domain: every column of up to three values, every operator,
    literal and side; max_distinct=1 folds all but one string and set element, and a TOP-1
    bounds the order comparisons."""
    clauses: list[Node] = [Attribute("v")]
    for op in ("==", "!=", "<", "<=", ">", ">=", "in", "not in"):
        for value in POOL_LITERALS:
            clauses += [Compare(op, Attribute("v"), Literal(value)), Compare(op, Literal(value), Attribute("v"))]
    evaluators = [Requirement(clause) for clause in clauses]
    for size in (1, 2, 3):
        for column in itertools.combinations_with_replacement(range(len(POOL)), size):
            nodes = [{} if POOL[i] is None else {"v": POOL[i]} for i in column]
            summary = merge([summarise(a, contact(n), FOLDING) for n, a in enumerate(nodes)], FOLDING)
            for clause, requirement in zip(clauses, evaluators, strict=True):
                results = [requirement.evaluate(a) for a in nodes]
                holders, may_fail = possible(clause, summary)
                assert holders >= sum(results), (str(requirement), nodes)
                assert may_fail or all(results), (str(requirement), nodes)


@pytest.mark.parametrize(
    ("text", "holds"),
    [
        ("cpu >= 2", True), ("cpu > 2", False), ("cpu < 2", False), ("cpu == 2", True), ("cpu != 2", False),
        ('os == "linux"', True), ('os != "linux"', False), ('os in {"linux", "darwin"}', True),
        ('os not in {"linux"}', False), ('"ssd" in tags', True), ('"gpu" in tags', False),
        ('"gpu" not in tags', True), ("gpu", True), ("not gpu", False), ('owner == "x"', False),
        ('not owner == "x"', True), ("memory_free >= 512M", True), ("memory_free >= 2G", False),
    ],
)
def test_pruning_is_exact_on_a_single_node_for_common_clauses(text, holds):
    attrs = normalize_attributes({"cpu": 2, "os": "linux", "tags": {"ssd"}, "gpu": True,
                                  "memory_free": 1 << 30})
    requirement = Requirement.parse(text)
    assert requirement.evaluate(attrs) is holds
    assert possible(requirement.node, summarise(attrs, contact(0), LIMITS)) == (int(holds), not holds)


categorical = st.fixed_dictionaries({}, optional={
    "os": st.sampled_from(("linux", "freebsd", "darwin")), "arch": st.sampled_from(("x86_64", "riscv64")),
    "gpu": st.booleans(), "tags": st.frozensets(st.sampled_from(("ssd", "ipv6", "edge")), max_size=2)})
facet_clauses = st.one_of(
    st.builds(lambda v: Compare("==", Attribute("os"), Literal(v)), st.sampled_from(("linux", "freebsd", "darwin"))),
    st.builds(lambda v: Compare("==", Literal(v), Attribute("arch")), st.sampled_from(("x86_64", "riscv64"))),
    st.builds(lambda v: Compare("==", Attribute("gpu"), Literal(v)), st.booleans()),
    st.builds(lambda v: Compare("in", Literal(v), Attribute("tags")), st.sampled_from(("ssd", "ipv6", "edge"))),
)


@settings(max_examples=150)
@given(st.lists(categorical, min_size=1, max_size=12), st.lists(facet_clauses, min_size=2, max_size=3),
       st.integers(0, 2**32))
def test_the_pair_filter_never_rules_out_a_combination_some_node_has(nodes, clauses, seed):
    requirement = Requirement(And(tuple(clauses)))
    summary = merged_randomly([summarise(n, contact(i), LIMITS) for i, n in enumerate(nodes)], LIMITS, seed)
    assert match_bound(requirement, summary) >= sum(requirement.evaluate(n) for n in nodes)


def test_values_that_never_occur_together_on_one_node_are_pruned():
    nodes = [{"os": "freebsd", "arch": "x86_64", "tags": {"ipv6"}}, {"os": "linux", "arch": "riscv64"},
             {"os": "linux", "arch": "x86_64", "tags": {"ssd"}, "gpu": True}]
    summary = merge([summarise(normalize_attributes(n), contact(i), LIMITS) for i, n in enumerate(nodes)], LIMITS)
    assert not may_match(Requirement.parse('os == "freebsd" and arch == "riscv64"'), summary)
    assert not may_match(Requirement.parse('"ipv6" in tags and arch == "riscv64"'), summary)
    assert not may_match(Requirement.parse('gpu == true and os == "freebsd"'), summary)
    assert may_match(Requirement.parse('os == "freebsd" and "ipv6" in tags'), summary)
    assert may_match(Requirement.parse('gpu and "ssd" in tags and arch == "x86_64"'), summary)


def test_top_k_bounds_how_many_nodes_can_have_a_high_value():
    summary = merge([summarise({"memory_free": v}, contact(v), LIMITS) for v in range(1, 11)], LIMITS)
    assert [e.value for e in summary.numbers["memory_free"].top] == [10, 9, 8]
    assert match_bound(Requirement.parse("memory_free >= 9"), summary) == 2
    assert match_bound(Requirement.parse("memory_free > 10"), summary) == 0
    assert match_bound(Requirement.parse("memory_free >= 5"), summary) == 10  # beyond the top: only COUNT
    assert match_bound(Requirement.parse("memory_free >= 9 or memory_free < 2"), summary) == 12 - 2


def test_a_subtree_without_the_value_asked_for_is_pruned():
    nodes = [{"os": "linux", "memory_free": 4 << 30}, {"os": "darwin", "memory_free": 64 << 30}]
    summary = merge([summarise(n, contact(i), LIMITS) for i, n in enumerate(nodes)], LIMITS)
    assert not may_match(Requirement.parse('os == "freebsd"'), summary)
    assert not may_match(Requirement.parse("memory_free >= 100G"), summary)
    assert may_match(Requirement.parse('memory_free >= 32G and os == "linux"'), summary)  # MAX and values
    assert not may_match(Requirement.parse('"gpu" in tags'), summary)


# -- attributes and peers' input ------------------------------------------------------------


def test_attributes_that_cannot_be_published_are_named():
    with pytest.raises(ValueError, match="attribute 'load'.*finite"):
        normalize_attributes({"load": float("nan")})
    with pytest.raises(ValueError, match="attribute '9lives'"):
        normalize_attributes({"9lives": 1})
    with pytest.raises(ValueError, match=r"attribute 'tags'.*set item"):
        normalize_attributes({"tags": [("nested",)]})
    with pytest.raises(TypeError, match="mapping"):
        normalize_attributes([("cpu", 1)])


@given(attribute_maps)
def test_attributes_travel_and_come_back_the_same(attrs):
    normalized = normalize_attributes(attrs)
    assert attributes_from_wire(attributes_to_wire(normalized)) == normalized


def test_a_peers_bad_summary_is_named():
    good = summarise({"cpu": 2, "os": "linux"}, contact(0), LIMITS)
    assert summary_problem(good) is None
    assert "nodes" in summary_problem(Summary(0))
    assert "finite" in summary_problem(Summary(1, {"cpu": NumberStats(1, math.nan, 1, 1)}))
    assert "low is above high" in summary_problem(Summary(1, {"cpu": NumberStats(1, 2, 3, 1)}))
    assert "bad value counts" in summary_problem(Summary(1, strings={"os": StringCounts({"x": -1})}))
    assert "bad attribute name" in summary_problem(Summary(1, {"no spaces": NumberStats(1, 1, 1, 1)}))
    assert attributes_from_wire({"cpu": math.inf}) is None
    assert attributes_from_wire({"cpu": [["nested"]]}) is None


def test_summaries_round_trip_through_the_wire_codec():
    from p2pdeploy.collective.prospector import AggregateUpdate

    attrs = normalize_attributes({"cpu": 2.5, "memory_free": 1 << 33, "os": "linux", "tags": {"ssd", 3},
                                  "gpu": False})
    summary = merge([summarise(attrs, contact(0), LIMITS), summarise({"cpu": 1}, contact(1), LIMITS)], LIMITS)
    msg = AggregateUpdate(7, 9, 1, 2, attributes_to_wire(attrs), summary)
    decoded = wire.decode(wire.encode(msg), limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert decoded == msg
    assert decoded.summary.numbers["memory_free"].total == 1 << 33  # integers stay exact
    assert isinstance(decoded.summary.numbers["memory_free"].top[0], TopEntry)
