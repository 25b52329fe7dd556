"""The deployer's replica count: the smallest count that meets the availability target, exactly computed."""

import math
from itertools import product

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.collective.deployer import TOLERANCE, replica_count, service_availability, up_distribution
from p2pdeploy.resource.manifest import Placement


def brute_force(ps, needed):
    """P[at least ``needed`` of the nodes up], by enumerating every up/down pattern."""
    total = 0.0
    for pattern in product((0, 1), repeat=len(ps)):
        if sum(pattern) >= needed:
            total += math.prod(p if up else 1 - p for p, up in zip(ps, pattern, strict=True))
    return total


@given(st.lists(st.floats(0, 1), max_size=8))
def test_the_distribution_of_nodes_up_agrees_with_enumeration(ps):
    dist = up_distribution(ps)
    assert math.isclose(sum(dist), 1.0)
    assert math.isclose(service_availability(ps), brute_force(ps, 1), abs_tol=1e-12)
    assert math.isclose(
        service_availability(ps, quorum=True), brute_force(ps, len(ps) // 2 + 1), abs_tol=1e-12
    )


def test_the_best_nodes_are_counted_first_and_the_reason_names_them():
    result = replica_count(Placement(availability=0.999), [0.9, 0.8, 0.95, 0.93])
    assert result.count == 3
    assert result.reason == "availability 0.999: 3 replicas on nodes up 95%, 93%, 90% give 0.99965"
    assert math.isclose(result.expected_availability, 1 - 0.05 * 0.07 * 0.1)


def test_an_unreachable_target_runs_the_most_replicas_allowed_and_says_so():
    result = replica_count(Placement(availability=0.9999), [0.6] * 10)
    assert result.count == 7
    assert (
        result.reason == "availability 0.9999 not reachable within max_replicas 7: 7 replicas give 0.998362"
    )
    fewer = replica_count(Placement(availability=0.9999), [0.6] * 3)
    assert fewer.count == 3 and fewer.reason.startswith(
        "availability 0.9999 not reachable within the 3 candidates"
    )


def test_fewer_candidates_than_the_minimum_still_asks_for_the_minimum():
    result = replica_count(Placement(availability=0.9, min_replicas=3), [0.99])
    assert result.count == 3 and result.reason.startswith(
        "availability 0.9: placement.min_replicas 3 but only 1 candidate (nodes up 99%) give 0.99"
    )
    assert replica_count(Placement(availability=0.9), []).count == 1


def test_unmeasured_nodes_count_as_the_unknown_availability():
    measured = replica_count(Placement(availability=0.999), [0.9, 0.9, 0.9])
    unmeasured = replica_count(Placement(availability=0.999), [float("nan"), -1.0, 1.5])
    assert measured == unmeasured and measured.count == 3  # 1 - 0.1**3 meets 0.999 within the tolerance
    assert (
        replica_count(Placement(availability=0.999), [float("nan")] * 3, unknown_availability=0.5).count == 3
    )
    assert (
        replica_count(Placement(availability=0.999), [float("nan")] * 9, unknown_availability=0.5).count == 7
    )


def test_a_fixed_count_and_mode_every_ignore_the_target_arithmetic():
    fixed = replica_count(Placement(replicas=3), [0.9] * 5)
    assert (fixed.count, fixed.reason) == (3, "fixed: placement.replicas = 3")
    assert math.isclose(fixed.expected_availability, 0.999)
    every = replica_count(Placement(mode="every"), [0.5] * 4)
    assert (every.count, every.reason) == (4, "every node that satisfies the constraints (4)")


def test_a_quorum_needs_a_majority_so_two_replicas_are_worse_than_one():
    result = replica_count(Placement(availability=0.99), [0.9] * 9, quorum=True)
    assert result.count == 5 and result.reason.startswith("availability 0.99 (a majority up): 5 replicas")
    assert service_availability([0.9, 0.9], quorum=True) < service_availability([0.9], quorum=True)


AVAILABILITIES = st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), max_size=12)


@st.composite
def targets(draw):
    low = draw(st.integers(1, 5))
    high = draw(st.integers(low, 9))
    return Placement(availability=draw(st.floats(0.01, 0.99999)), min_replicas=low, max_replicas=high)


def probability(ps, n, quorum):
    ranked = sorted((p if 0 <= p <= 1 else 0.9 for p in ps), reverse=True)
    return service_availability(ranked[:n], quorum=quorum)


@given(targets(), AVAILABILITIES, st.booleans())
def test_the_count_is_the_smallest_within_bounds_that_meets_the_target(placement, ps, quorum):
    result = replica_count(placement, ps, quorum=quorum)
    low, high = placement.min_replicas, placement.max_replicas
    assert low <= result.count <= high
    assert result.count <= max(low, len(ps))
    assert math.isclose(result.expected_availability, probability(ps, result.count, quorum), abs_tol=1e-12)
    if "not reachable" not in result.reason and len(ps) >= low:
        assert result.expected_availability >= placement.availability - TOLERANCE
        for fewer in range(low, result.count):  # minimality: no smaller count would do
            assert probability(ps, fewer, quorum) < placement.availability - TOLERANCE
    if "not reachable" in result.reason:
        top = min(high, len(ps))
        assert all(
            probability(ps, n, quorum) < placement.availability - TOLERANCE for n in range(low, top + 1)
        )
        assert result.expected_availability == max(probability(ps, n, quorum) for n in range(low, top + 1))


@given(targets(), st.floats(0.01, 0.99999), AVAILABILITIES, st.booleans())
def test_a_higher_target_never_asks_for_fewer_replicas(placement, other, ps, quorum):
    lower, higher = sorted((placement.availability, other))
    bounds = {"min_replicas": placement.min_replicas, "max_replicas": placement.max_replicas}
    count_low = replica_count(Placement(availability=lower, **bounds), ps, quorum=quorum).count
    count_high = replica_count(Placement(availability=higher, **bounds), ps, quorum=quorum).count
    assert count_low <= count_high


def test_an_impossible_unknown_availability_is_a_local_error():
    with pytest.raises(ValueError, match="unknown_availability must be between 0 and 1"):
        replica_count(Placement(), [], unknown_availability=2)
