"""Content filters: the requirements language over event attributes, with clear errors."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from p2pdeploy.collective.filters import MATCH_ALL, Filter, FilterError, event_attributes, event_value

NAMES = st.sampled_from(["service", "state", "memory_free", "cpu_free", "tags", "node", "kind", "run"])
STRINGS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
NUMBERS = st.one_of(st.integers(min_value=-(10**12), max_value=10**12),
                    st.floats(allow_nan=False, allow_infinity=False, width=32))
VALUES = st.one_of(NUMBERS, STRINGS, st.booleans(), st.frozensets(STRINGS, max_size=4))
ATTRIBUTES = st.dictionaries(NAMES, VALUES, max_size=6)


def literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) else repr(float(value))
    if isinstance(value, str):
        import json

        return json.dumps(value)
    return "{" + ", ".join(literal(v) for v in sorted(value)) + "}"


# -- examples from the issue ----------------------------------------------------------------


def test_the_issue_examples_select_the_events_they_describe():
    wiki_down = Filter.parse('service == "wiki" and state in {"failed", "stopped"}')
    assert wiki_down.matches({"service": "wiki", "state": "failed"})
    assert wiki_down.matches({"service": "wiki", "state": "stopped", "extra": 1})
    assert not wiki_down.matches({"service": "wiki", "state": "running"})
    assert not wiki_down.matches({"service": "db", "state": "failed"})
    assert not wiki_down.matches({"state": "failed"})  # no service attribute: the comparison is false
    big = Filter.parse("memory_free >= 2G")
    assert big.matches({"memory_free": 2 * 1024**3}) and not big.matches({"memory_free": 2 * 1024**3 - 1})
    assert not big.matches({"memory_free": "lots"})


def test_an_empty_filter_matches_everything():
    for source in (None, "", "   \n"):
        parsed = Filter.parse(source)
        assert parsed is MATCH_ALL and parsed.matches_everything and str(parsed) == ""
        assert parsed.matches({}) and parsed.matches({"anything": 1})


@pytest.mark.parametrize(("source", "column", "words"), [
    ("service == ", 12, "expected a value after '=='"),
    ('service == "wiki" and', 22, "expected a value"),
    ('state in {"failed", "stopped"', 30, "expected ',' or '}'"),
    ("memory_free >= 2Q", 17, "unknown size unit 'Q'"),
    ("service = wiki", 9, "unexpected character '='"),
    ('service == "wiki', 12, "unterminated string"),
    ("(a == 1", 8, "expected ')'"),
])
def test_bad_filters_name_the_column_and_the_problem(source, column, words):
    with pytest.raises(FilterError) as error:
        Filter.parse(source)
    assert error.value.column == column
    assert str(error.value).startswith("filter: ") and words in str(error.value)


def test_a_filter_that_is_not_text_is_an_error():
    with pytest.raises(FilterError, match="expected text, not int"):
        Filter.parse(42)


# -- properties -----------------------------------------------------------------------------


@given(st.text(max_size=60))
def test_parsing_any_text_gives_a_filter_or_a_filter_error(source):
    try:
        parsed = Filter.parse(source)
    except FilterError as exc:
        assert str(exc).startswith("filter: ")
        assert 0 <= exc.column <= len(source) + 1
    else:
        assert Filter.parse(str(parsed)).requirement == parsed.requirement  # canonical text reads back


@given(st.text(alphabet='abc=!<>{}()", 012.and or not in', max_size=40))
def test_near_misses_of_the_grammar_never_escape_as_other_errors(source):
    with contextlib.suppress(FilterError):  # anything else propagates and fails the test
        Filter.parse(source)


@given(NAMES, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), NUMBERS, ATTRIBUTES)
def test_a_numeric_comparison_agrees_with_python(name, op, value, attributes):
    assume(not (isinstance(value, float) and math.isnan(value)))
    parsed = Filter.parse(f"{name} {op} {literal(value)}")
    actual = attributes.get(name)
    expected = False
    if isinstance(actual, int | float) and not isinstance(actual, bool):
        expected = {"==": actual == value, "!=": actual != value, "<": actual < value, "<=": actual <= value,
                    ">": actual > value, ">=": actual >= value}[op]
    assert parsed.matches(attributes) == expected


@given(NAMES, st.frozensets(STRINGS, min_size=1, max_size=4), ATTRIBUTES)
def test_membership_in_a_set_agrees_with_python(name, options, attributes):
    parsed = Filter.parse(f"{name} in {literal(options)}")
    actual = attributes.get(name)
    assert parsed.matches(attributes) == (isinstance(actual, str) and actual in options)


@given(ATTRIBUTES, ATTRIBUTES)
def test_and_or_not_compose_like_booleans(first, attributes):
    a = Filter.parse(" and ".join(f"{k} == {literal(v)}" for k, v in first.items()) or "true")
    b = Filter.parse('kind == "replica_changed"')
    both = Filter.parse(f"({a}) and ({b})")
    either = Filter.parse(f"({a}) or ({b})")
    neither = Filter.parse(f"not (({a}) or ({b}))")
    assert both.matches(attributes) == (a.matches(attributes) and b.matches(attributes))
    assert either.matches(attributes) == (a.matches(attributes) or b.matches(attributes))
    assert neither.matches(attributes) == (not either.matches(attributes))


# -- event attributes -----------------------------------------------------------------------


def test_event_attributes_are_checked_and_sets_become_sorted_lists():
    assert event_attributes({"tags": frozenset({"b", "a"}), "n": 3, "x": 1.5, "ok": True, "s": "v"}) == {
        "tags": ["a", "b"], "n": 3, "x": 1.5, "ok": True, "s": "v"}
    with pytest.raises(TypeError, match="event attribute nested must be"):
        event_value("nested", {"a": 1})
    with pytest.raises(ValueError, match="event attribute load must be a finite number"):
        event_value("load", math.nan)
    with pytest.raises(TypeError, match="set of strings only"):
        event_value("ports", [80, 443])
    with pytest.raises(TypeError, match="names are non-empty strings"):
        event_attributes({"": 1})
