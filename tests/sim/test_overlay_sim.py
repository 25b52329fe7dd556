"""The Kademlia overlay in the simulator: the scenario files' figures, on smaller networks.

The acceptance sizes (1,000 and 10,000 static nodes, 2,000 nodes under an hour of churn) run
as ``slow`` tests (``make check-slow``); the suite runs the same scenario files scaled down.
"""

import math
from pathlib import Path

import pytest

from p2pdeploy.sim.scenario import load_scenario, run_scenario

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"


def _run(name, *overrides, seed=None):
    scenario = load_scenario(SIMULATIONS / name, overrides=overrides, seed=seed)
    return run_scenario(scenario).summary


def test_join_built_network_finds_the_true_k_closest():
    summary = _run("overlay-static.toml", "nodes=300", "overlay.lookups=200", "overlay.join_spacing_s=0.05",
                   "duration_s=150")
    assert summary["lookups"] == 200
    assert summary["lookup_success"] == 1.0
    assert summary["exact_k_closest"] == 1.0
    assert 1 <= summary["hops_median"] <= math.log2(300)
    assert summary["joins_failed"] == 0


def test_oracle_built_network_finds_the_true_k_closest_with_disjoint_paths():
    summary = _run("overlay-static.toml", "nodes=2000", "overlay.build=oracle", "overlay.lookups=200",
                   "overlay.disjoint_paths=2", "overlay.settle_s=0", "duration_s=70", "trace=false")
    assert summary["lookup_success"] == 1.0
    assert summary["exact_k_closest"] == 1.0


def test_same_seed_same_trace_and_another_seed_another():
    overrides = ("nodes=60", "overlay.lookups=30", "duration_s=60", "overlay.settle_s=5",
                 "overlay.workload_window_s=20")
    first = _run("overlay-static.toml", *overrides, seed=3)
    again = _run("overlay-static.toml", *overrides, seed=3)
    other = _run("overlay-static.toml", *overrides, seed=4)
    assert first["trace_hash"] == again["trace_hash"]
    assert first["events"] == again["events"]
    assert first["trace_hash"] != other["trace_hash"]


def test_values_stored_before_churn_are_found_during_it():
    summary = _run("overlay-churn.toml", "nodes=300", "overlay.join_spacing_s=0.1", "churn.start_s=120",
                   "overlay.values=40", "overlay.gets=300", "overlay.lookups=0", "overlay.workload_delay_s=50",
                   "overlay.workload_window_s=1200", "duration_s=1350", "churn.session.median_s=600",
                   "churn.downtime.median_s=600", "trace=false")
    assert summary["departures"] > 100  # the churn was real: most nodes left at least once
    assert summary["gets"] >= 280
    assert summary["get_success"] >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("nodes=1000",), ("nodes=10000", "overlay.build=oracle", "trace=false")])
def test_acceptance_static_network(overrides):
    summary = _run("overlay-static.toml", *overrides)
    assert summary["lookups"] == 1000
    assert summary["exact_k_closest"] == 1.0


@pytest.mark.slow
def test_acceptance_churn():
    summary = _run("overlay-churn.toml")
    assert summary["get_success"] >= 0.99
