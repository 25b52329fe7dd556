"""The ``node`` runner: full nodes, every layer composed by ``p2pdeploy.node``, under churn."""

from pathlib import Path

import pytest

from p2pdeploy.sim.scenario import load_scenario, run_scenario
from p2pdeploy.sim.schema import ScenarioError

NODE_CHURN = Path(__file__).parents[2] / "simulations" / "node-churn.toml"
SMALL = ["nodes=60", "duration_s=700", "overlay.join_spacing_s=0.2", "overlay.workload_window_s=300",
         "overlay.lookups=60", "overlay.gets=60", "overlay.values=10", "persistence.blobs=6", "node.prospects=40"]


def run(*overrides: str, seed: int | None = None) -> dict:
    return run_scenario(load_scenario(NODE_CHURN, overrides=[*SMALL, *overrides], seed=seed)).summary


@pytest.fixture(scope="module")
def summary() -> dict:
    return run()


def test_every_layer_of_a_full_node_runs_under_churn(summary):
    sent = summary["messages_per_node_per_s"]
    # the overlay, persistence and the prospector send on their own; the rest only when asked
    assert {"Kademlia", "Persistence", "Prospector"} <= set(sent)
    assert summary["departures"] > 0 and summary["arrivals"] > 0
    assert summary["prospects"] > 0 and summary["prospect_success"] >= 0.9
    assert summary["get_success"] >= 0.95 and summary["blobs_lost"] == 0


def test_the_same_seed_gives_the_same_trace_and_another_seed_another(summary):
    again = run()
    assert again["trace_hash"] == summary["trace_hash"] and again["events"] == summary["events"]
    assert run(seed=2)["trace_hash"] != summary["trace_hash"]


def test_a_full_node_needs_ed25519_identities():
    with pytest.raises(ScenarioError, match="ed25519"):
        load_scenario(NODE_CHURN, overrides=["overlay.identities=hash"])


def test_every_node_advertises_the_availability_its_own_sessions_give():
    from p2pdeploy.resource.description import NodeDescription

    result = run_scenario(load_scenario(NODE_CHURN, overrides=SMALL))
    runner, now = result.runner, result.sim.now
    advertised = {}
    for address, host in enumerate(result.sim.hosts):
        if not host.up:
            continue
        history = runner.uptime[address]
        attributes = host.core.layer(NodeDescription).attributes()
        assert now - history.last_heartbeat_s <= 60.0
        measured = history.availability(history.last_heartbeat_s)  # what the last heartbeat saw
        if measured is None:  # less than a minute of history
            assert "availability" not in attributes
            continue
        advertised[address] = attributes["availability"]
        assert abs(advertised[address] - measured) < 0.005  # announced again once it moved that much
    assert advertised and all(0.0 <= a <= 1.0 for a in advertised.values())
    churned = [a for a in advertised if len(runner.uptime[a].sessions) > 0]
    assert churned and all(advertised[a] < 1.0 for a in churned)  # a crash shows as downtime
    assert any(a == 1.0 for a in advertised.values())  # and a node never down shows none
