"""The prospector in the simulator: the scenario files' figures, on smaller networks.

The acceptance sizes (10,000 static nodes; 2,000 nodes under an hour of churn) run as ``slow``
tests (``make check-slow``); the suite runs the same scenario files scaled down.
"""

import math
from pathlib import Path

import pytest

from p2pdeploy.sim.scenario import ScenarioError, load_scenario, run_scenario

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"
SMALL_STATIC = ("nodes=300", "duration_s=50", "prospector.prospects=60", "prospector.aggregates=20",
                "prospector.queries_at_s=15", "prospector.queries_window_s=30")
SMALL_CHURN = ("nodes=150", "duration_s=700", "overlay.join_spacing_s=0.1", "churn.start_s=100",
               "churn.session.median_s=600", "churn.downtime.median_s=600", "prospector.measure_from_s=200",
               "prospector.queries_at_s=200", "prospector.queries_window_s=450", "prospector.prospects=100",
               "prospector.aggregates=30")


def _run(name, *overrides, seed=None):
    return run_scenario(load_scenario(SIMULATIONS / name, overrides=overrides, seed=seed)).summary


def test_static_network_counts_exactly_and_prospects_return_matching_nodes():
    summary = _run("prospector.toml", *SMALL_STATIC)
    assert summary["roots"] == 1 and summary["nodes_without_depth"] == 0
    assert summary["count_error"] == 0.0 and summary["sum_error"] == 0.0
    assert summary["convergence_s"] is not None and summary["convergence_s"] < 10.0
    assert summary["aggregate_ok"] == 1.0 and summary["aggregate_error_max"] == 0.0
    assert summary["prospects"] == 60
    assert summary["prospect_only_matching"] == 1.0
    assert summary["prospect_success"] == 1.0  # n found whenever n exist
    assert summary["prospect_fewer_found_all"] in (1.0, None)  # all found when fewer exist
    assert summary["prospect_messages_with_n_matches"] <= 2 * math.log2(300)


def test_same_seed_same_trace_and_another_seed_another():
    overrides = ("nodes=60", "duration_s=30", "trace=true", "prospector.prospects=10", "prospector.aggregates=5",
                 "prospector.queries_at_s=10", "prospector.queries_window_s=10")
    first = _run("prospector.toml", *overrides, seed=3)
    again = _run("prospector.toml", *overrides, seed=3)
    other = _run("prospector.toml", *overrides, seed=4)
    assert first["trace_hash"] == again["trace_hash"] and first["events"] == again["events"]
    assert first["trace_hash"] != other["trace_hash"]


def test_under_churn_count_follows_the_live_nodes_and_prospects_find_matches():
    summary = _run("prospector-churn.toml", *SMALL_CHURN)
    assert summary["departures"] > 50  # the churn was real
    # about 80 nodes are up: one node is more than 1%
    assert summary["count_error_median"] <= 0.05
    assert summary["count_within_5pct"] >= 0.9
    assert summary["aggregate_ok"] == 1.0
    assert summary["prospect_success_any_match"] >= 0.97
    assert summary["prospect_only_matching"] >= 0.97


def test_a_bad_requirement_in_a_scenario_is_named():
    with pytest.raises(ScenarioError, match=r"prospector.requirements has a bad requirement 'cpu >='"):
        load_scenario(SIMULATIONS / "prospector.toml", overrides=["prospector.requirements=cpu >= 1; cpu >="])
    with pytest.raises(ScenarioError, match="expiry_s must be > update_interval_s"):
        load_scenario(SIMULATIONS / "prospector.toml", overrides=["prospector.expiry_s=5"])


@pytest.mark.slow
def test_acceptance_static_10000_nodes_exact_count_and_sum_and_cheap_prospects():
    summary = _run("prospector.toml")
    assert summary["count_error"] == 0.0 and summary["sum_error"] == 0.0
    assert summary["convergence_s"] is not None
    assert summary["prospect_only_matching"] == 1.0
    assert summary["prospect_success"] == 1.0
    assert summary["prospect_fewer_found_all"] == 1.0
    assert summary["prospect_messages_with_n_matches"] <= 2 * summary["log2_n"]


@pytest.mark.slow
def test_acceptance_churn_2000_nodes_count_within_5_percent_and_prospects_succeed():
    summary = _run("prospector-churn.toml")
    assert summary["count_error"] <= 0.05
    assert summary["prospect_success_any_match"] >= 0.99
