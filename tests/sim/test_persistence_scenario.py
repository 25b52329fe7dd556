"""The persistence churn scenario: its figures on a smaller network, and at acceptance size (slow).

``simulations/persistence-churn.toml`` stores blobs with r = 3, 2 and 1 and runs churn where
half of the departures lose their disk. The suite runs it scaled down; ``make check-slow`` runs
the file as it is (N = 2,000, two hours): zero blobs lost with r = 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pdeploy.sim.scenario import ScenarioError, load_scenario, run_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "simulations" / "persistence-churn.toml"
#: 120 nodes, 20 minutes of churn with 10-minute sessions: most nodes leave at least once.
SMALL = ("nodes=120", "duration_s=1500", "churn.start_s=150", "overlay.join_spacing_s=0.2",
         "churn.session.median_s=600", "churn.downtime.median_s=600", "persistence.blobs=10",
         "persistence.blob_bytes=300000", "persistence.fetch_window_s=200")


def _run(*overrides: str, seed: int | None = None) -> dict:
    return run_scenario(load_scenario(SCENARIO, overrides=overrides, seed=seed)).summary


def test_a_scaled_down_churn_loses_no_blob_with_three_copies():
    summary = _run(*SMALL)
    assert summary["departures"] > 100 and summary["departures_permanent"] > 40
    assert summary["blobs"] == 30 and summary["blobs_stored_ok"] == 30
    assert summary["blobs_lost"] == 0
    assert summary["blobs_lost_r1"] >= summary["blobs_lost_r2"] >= 0
    assert summary["blobs_lost_r1"] > 0  # one copy does not survive this churn
    assert summary["keys_without_live_copy_max"] == 0
    assert summary["repair_bytes_per_node_per_s"] > 0
    assert summary["fetch_success"] >= 0.6


def test_graceful_departures_hand_their_keys_off_before_going_down():
    summary = _run("nodes=40", "duration_s=700", "churn.start_s=100", "overlay.join_spacing_s=0.5",
                   "churn.session.median_s=300", "churn.downtime.median_s=300", "persistence.blobs=4",
                   "persistence.blob_bytes=100000", "persistence.fetch_window_s=100",
                   "persistence.graceful_leaves=1.0", "persistence.permanent_departures=1.0",
                   "persistence.repair_interval_s=600")
    assert summary["departures"] > 20
    assert summary["graceful_leaves_handed_off"] >= summary["departures"] - 2
    assert summary["blobs_lost"] == 0 and summary["blobs_lost_r2"] == 0


def test_the_same_seed_gives_the_same_run():
    overrides = ("nodes=40", "duration_s=400", "churn.start_s=100", "overlay.join_spacing_s=0.5",
                 "churn.session.median_s=200", "churn.downtime.median_s=200", "persistence.blobs=3",
                 "persistence.blob_bytes=40000", "persistence.fetch_window_s=60", "trace=true")
    first, again = _run(*overrides, seed=2), _run(*overrides, seed=2)
    assert first["trace_hash"] == again["trace_hash"] and first["events"] == again["events"]
    assert first == again | {"wall_s": first["wall_s"], "events_per_second": first["events_per_second"]}


def test_the_scenario_names_a_bad_setting():
    with pytest.raises(ScenarioError, match="persistence.permanent_departures must be between 0 and 1"):
        load_scenario(SCENARIO, overrides=["persistence.permanent_departures=2"])
    with pytest.raises(ScenarioError, match="persistence.fetch_window_s"):
        load_scenario(SCENARIO, overrides=["persistence.fetch_window_s=8000"])


@pytest.mark.slow
def test_acceptance_two_hours_of_churn_on_2000_nodes_lose_no_blob_with_three_copies():
    from p2pdeploy.cli import main

    result = CliRunner().invoke(main, ["simulate", str(SCENARIO), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["nodes"] == 2000 and summary["duration_s"] == 7500.0
    assert summary["blobs_lost"] == 0
    for key in ("blobs_lost_r1", "blobs_lost_r2", "repair_bytes_per_node_per_s"):
        assert summary[key] is not None
    assert summary["blobs_lost_r1"] > summary["blobs_lost"]
