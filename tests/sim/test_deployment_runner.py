"""The ``deployment`` runner: services deployed on full nodes under churn, availability by ground truth."""

from pathlib import Path

import pytest

from p2pdeploy.sim.scenario import load_scenario, run_scenario
from p2pdeploy.sim.schema import ScenarioError

AVAILABILITY = Path(__file__).parents[2] / "simulations" / "availability.toml"
#: 40 nodes, 20 minutes, 8 services; mild churn: sessions of median 2 hours, downtimes of 10 min.
SMALL = ["nodes=40", "duration_s=1200", "overlay.join_spacing_s=0.5", "churn.start_s=200",
         "churn.session.median_s=7200", "churn.downtime.median_s=600", "deployment.services=8",
         "deployment.warmup_s=120"]
KEYS = ("availability_median", "availability_p10", "availability_by_target", "replicas_mean",
        "replacement_s_median", "replacement_s_p95", "desired_state_lost", "false_replacements")
#: What differs between two runs of one seed: the machine's speed.
WALL = ("wall_s", "events_per_second")


def run(*overrides: str, seed: int | None = None) -> dict:
    return run_scenario(load_scenario(AVAILABILITY, overrides=[*SMALL, *overrides], seed=seed)).summary


@pytest.fixture(scope="module")
def summary() -> dict:
    return run()


def test_the_run_reports_every_key(summary):
    assert set(KEYS) <= set(summary)
    assert summary["services_deployed"] == 8
    assert set(summary["availability_by_target"]) <= {"0.99", "0.999", "fixed"}
    assert summary["replicas_mean"] >= 1
    assert summary["departures"] > 0


def test_services_stay_available_and_keep_their_desired_state_under_mild_churn(summary):
    assert summary["availability_median"] >= 0.99
    assert summary["availability_p10"] >= 0.9
    assert summary["desired_state_lost"] == 0
    assert summary["false_replacements"] == 0


def test_a_higher_target_gets_more_replicas_from_the_nodes_uptime_history(summary):
    # every node starts with a week of history drawn from the churn, so none looks always up
    replicas = summary["replicas_by_target"]
    assert 1 < replicas["0.99"] < replicas["0.999"] <= 10


@pytest.fixture(scope="module")
def churny() -> dict:
    return run("churn.session.median_s=900")  # more departures, so hosts of replicas go down


def test_a_replica_lost_with_its_host_is_replaced(churny):
    assert churny["losses"] > 0 and churny["replacements"] > 0
    assert 0 < churny["replacement_s_median"] < 120
    assert churny["false_replacements"] == 0


def test_a_replica_lost_in_a_quick_reboot_of_its_host_is_replaced_too(churny):
    assert churny["replacement_s_p95"] < 300


def test_the_same_seed_gives_the_same_summary(summary):
    again = run()
    assert {k: v for k, v in again.items() if k not in WALL} == {k: v for k, v in summary.items() if k not in WALL}


def test_targets_must_be_availabilities():
    with pytest.raises(ScenarioError, match=r"deployment.targets must hold numbers"):
        load_scenario(AVAILABILITY, overrides=["deployment.targets=[0.99, 1.5]"])
    with pytest.raises(ScenarioError, match=r"deployment.targets must be a non-empty list"):
        load_scenario(AVAILABILITY, overrides=["deployment.targets=0.99"])


def test_the_deploys_wait_for_the_network_to_be_built():
    with pytest.raises(ScenarioError, match=r"deployment.deploy_at_s must be >= 49.95"):
        load_scenario(AVAILABILITY, overrides=["deployment.deploy_at_s=10"])
