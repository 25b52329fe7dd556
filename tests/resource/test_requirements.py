"""The requirements language: parsing, printing, matching, explaining, and its error messages."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.fabric.units import GIB, MIB
from p2pdeploy.resource.requirements import (
    And,
    Attribute,
    Compare,
    Literal,
    Not,
    Or,
    ParseError,
    Requirement,
    format_node,
    parse,
)

NODE = {
    "cpu": 2.0, "cpu_free": 0.5, "memory_free": 256 * MIB, "os": "linux", "arch": "x86_64",
    "tags": frozenset({"ssd", "gpu"}), "owner": "alice", "load": 0.3,
}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "holds"),
    [
        ('cpu >= 1 and os == "linux" and not owner == "mallory"', True),
        ('arch in {"x86_64", "aarch64"}', True),
        ('"gpu" in tags and "tpu" not in tags', True),
        ("memory_free >= 512M", False),
        ("memory_free >= 256Mi and memory_free < 0.5GiB", True),
        ('os == "linux" and (cpu_free >= 1 or load < 0.5)', True),
        ("not (cpu > 1 and cpu < 3)", False),
        ('missing == "x"', False),
        ('not missing == "x"', True),
        ('os >= "a"', False),  # order comparisons are for numbers
        ('cpu == "2"', False),  # values of different kinds never compare equal
        ("true", True),
        ("-1 < load", True),
    ],
)
def test_requirements_evaluate_against_a_node(text, holds):
    assert Requirement.parse(text).evaluate(NODE) is holds


def test_explain_lists_each_failed_clause_with_the_values_that_failed_it():
    requirement = Requirement.parse('cpu_free >= 1 and memory_free >= 512M and os == "linux" and not owner == "alice"')
    assert requirement.explain(NODE) == [
        "cpu_free >= 1 (cpu_free is 0.5)",
        "memory_free >= 512M (memory_free is 256 MiB)",
        'not owner == "alice" (owner is "alice")',
    ]
    assert Requirement.parse("gpus >= 1").explain(NODE) == ["gpus >= 1 (gpus is not known)"]
    assert Requirement.parse('os == "linux"').explain(NODE) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu >= ", "requirement: expected a value after '>=' at column 8 (found the end)"),
        ("cpu >= 1 and", "requirement: expected a value after 'and' at column 13 (found the end)"),
        ("cpu >= 1 memory", "requirement: expected 'and', 'or' or the end at column 10 (found 'memory')"),
        ("memory >= 5Q", "requirement: unknown size unit 'Q' after 5 at column 12"),
        ('os == "linux', "requirement: unterminated string at column 7"),
        ("(cpu >= 1", "requirement: expected ')' to close the '(' at column 1 at column 10 (found the end)"),
        ("arch in {x86}", "requirement: a set holds numbers, strings or booleans at column 10"),
        ("cpu >= 1 & os", "requirement: unexpected character '&' at column 10"),
        ("", "requirement: empty requirement at column 1"),
        ("(" * 100 + "x" + ")" * 100, "requirement: nested more than 64 levels deep"),
    ],
)
def test_a_malformed_requirement_is_a_parse_error_naming_the_column(text, message):
    with pytest.raises(ParseError) as error:
        parse(text)
    assert str(error.value).startswith(message)


def test_printing_is_canonical_and_keeps_how_sizes_were_written():
    requirement = Requirement.parse("memory_free>=512M and(os=='linux'or os=='freebsd')")
    assert str(requirement) == 'memory_free >= 512M and (os == "linux" or os == "freebsd")'
    assert requirement.node == parse(str(requirement))
    assert Requirement.parse("memory >= 2G").node == Compare(">=", Attribute("memory"), Literal(2 * GIB))
    assert Requirement.parse('cpu >= 1 and "gpu" in tags').attributes() == {"cpu", "tags"}


# -- properties -----------------------------------------------------------------------------

NAMES = st.sampled_from(["cpu", "memory_free", "os", "arch", "tags", "load", "a.b", "_x", "owner2"])
SCALARS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(max_size=12),
    st.booleans(),
)
SETS = st.one_of(
    st.frozensets(st.text(max_size=6), max_size=4),
    st.frozensets(st.integers(-1000, 1000), max_size=4),
)
OPERANDS = st.one_of(NAMES.map(Attribute), SCALARS.map(Literal), SETS.map(Literal))
COMPARISONS = st.builds(Compare, st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in"]), OPERANDS, OPERANDS)


def _trees(children):
    many = st.lists(children, min_size=2, max_size=4).map(tuple)
    return st.one_of(children.map(Not), many.map(And), many.map(Or))


TREES = st.recursive(st.one_of(COMPARISONS, OPERANDS), _trees, max_leaves=12)


@given(TREES)
def test_any_tree_prints_to_text_that_parses_back_to_it(tree):
    assert parse(format_node(tree)) == tree


@given(st.text(max_size=200))
def test_random_text_raises_nothing_but_parse_error(text):
    with contextlib.suppress(ParseError):
        Requirement.parse(text)


PIECES = list("()<>=!{},\"'\\ -.0123456789MKGie") + [" and ", " or ", " not ", " in ", "true", "cpu", "tags", "\\u00"]


@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_near_miss_expressions_raise_nothing_but_parse_error(pieces):
    with contextlib.suppress(ParseError):
        Requirement.parse("".join(pieces))


# Well-typed expressions over fully known attributes mean what the same Python expression means.
NUMBERS = st.one_of(st.sampled_from(["x", "y", "z"]).map(Attribute), st.integers(-50, 50).map(Literal))
STRINGS = st.sampled_from(["linux", "freebsd", "gpu", "ssd"])
TYPED = st.one_of(
    st.builds(Compare, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), NUMBERS, NUMBERS),
    st.builds(Compare, st.sampled_from(["==", "!="]), st.just(Attribute("os")), STRINGS.map(Literal)),
    st.builds(Compare, st.sampled_from(["in", "not in"]), STRINGS.map(Literal), st.just(Attribute("tags"))),
    st.builds(Compare, st.sampled_from(["in", "not in"]), st.just(Attribute("os")),
              st.frozensets(STRINGS, max_size=3).map(Literal)),
)  # fmt: skip
ATTRS = st.fixed_dictionaries({
    "x": st.integers(-50, 50), "y": st.integers(-50, 50), "z": st.integers(-50, 50),
    "os": STRINGS, "tags": st.frozensets(STRINGS, max_size=4),
})  # fmt: skip


def to_python(node):
    if isinstance(node, Literal):
        return repr(node.value)
    if isinstance(node, Attribute):
        return f"attrs[{node.name!r}]"
    if isinstance(node, Compare):
        return f"({to_python(node.left)} {node.op} {to_python(node.right)})"
    if isinstance(node, Not):
        return f"(not {to_python(node.item)})"
    word = " and " if isinstance(node, And) else " or "
    return "(" + word.join(to_python(item) for item in node.items) + ")"


@given(st.recursive(TYPED, _trees, max_leaves=10), ATTRS)
def test_matching_agrees_with_the_same_expression_evaluated_by_python(tree, attrs):
    expected = bool(eval(to_python(tree), {"attrs": attrs, "frozenset": frozenset}))  # noqa: S307 - our own text
    assert Requirement(tree).evaluate(attrs) is expected
    assert (Requirement(tree).explain(attrs) == []) is expected
