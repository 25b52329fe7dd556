"""The overlay runner's ``overlay.durable``: a node that comes back after churn keeps its store (as a
machine keeps its disk), and a get a node answers from its own store is counted like any other."""

from pathlib import Path

from p2pdeploy.sim.scenario import load_scenario, run_scenario

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"

#: 150 nodes, k = 3 and no replica republish within the run: a value lives only as long as
#: some of its holders keep it, and each node is down half of the time (median 5 min sessions).
HARSH_CHURN = ("nodes=150", "overlay.k=3", "overlay.join_spacing_s=0.1", "churn.start_s=60", "overlay.values=40",
               "overlay.gets=300", "overlay.lookups=0", "overlay.workload_delay_s=10",
               "overlay.workload_window_s=1200", "duration_s=1300", "churn.session.median_s=300",
               "churn.downtime.median_s=300", "trace=false")


def _run(name, *overrides):
    return run_scenario(load_scenario(SIMULATIONS / name, overrides=overrides)).summary


def test_nodes_that_keep_their_store_across_restarts_serve_values_that_would_be_lost():
    lost_memory = _run("overlay-churn.toml", *HARSH_CHURN, "overlay.durable=false")
    kept_disk = _run("overlay-churn.toml", *HARSH_CHURN, "overlay.durable=true")
    assert lost_memory["departures"] == kept_disk["departures"] > 150  # the same churn, and real
    assert lost_memory["gets"] == kept_disk["gets"] == 300
    assert lost_memory["get_success"] < 0.9
    assert kept_disk["get_success"] >= 0.95


def test_a_get_answered_from_the_nodes_own_store_is_counted():
    # k = 20 on 20 nodes: every node holds every value, so every get is answered locally
    summary = _run("overlay-churn.toml", "nodes=20", "churn.model=none", "overlay.values=5", "overlay.gets=50",
                   "overlay.lookups=0", "overlay.settle_s=5", "overlay.workload_delay_s=5",
                   "overlay.workload_window_s=20", "duration_s=100")
    assert summary["gets"] == 50 and summary["gets_unfinished"] == 0 and summary["get_success"] == 1.0
