"""Whole-system runs of the ping scenario: reproducibility, 1,000 nodes, loss and churn."""

import os
import subprocess
import sys

import pytest

from p2pdeploy.sim.scenario import parse_scenario, run_scenario


def run_ping(seed=1, **settings):
    scenario = {"protocol": "ping", "seed": seed, "metrics": {"per_node": False}}
    for key, value in settings.items():
        section, _, name = key.partition("__")
        if name:
            scenario.setdefault(section, {})[name] = value
        else:
            scenario[key] = value
    return run_scenario(parse_scenario(scenario))


NOISY = {
    "nodes": 200,
    "duration_s": 20.0,
    "network__jitter_ms": 5.0,
    "network__loss": 0.05,
    "churn__model": "sessions",
    "churn__session": {"distribution": "weibull", "median_s": 8.0, "shape": 0.6},
    "churn__downtime": {"distribution": "pareto", "median_s": 3.0, "shape": 1.5},
}


def test_the_same_seed_gives_the_same_event_trace_hash():
    first = run_ping(seed=11, **NOISY).summary
    second = run_ping(seed=11, **NOISY).summary
    assert first["trace_hash"] == second["trace_hash"]
    assert len(first["trace_hash"]) == 64
    assert first["events"] == second["events"]
    assert {k: v for k, v in first.items() if k not in ("events_per_second", "wall_s")} == {
        k: v for k, v in second.items() if k not in ("events_per_second", "wall_s")
    }


def test_a_different_seed_gives_a_different_event_trace_hash():
    assert run_ping(seed=11, **NOISY).summary["trace_hash"] != run_ping(seed=12, **NOISY).summary["trace_hash"]


def test_metric_sampling_does_not_change_the_event_trace():
    coarse = run_ping(seed=3, nodes=50, duration_s=10.0, metrics__sample_interval_s=5.0)
    fine = run_ping(seed=3, nodes=50, duration_s=10.0, metrics__sample_interval_s=0.25)
    assert coarse.summary["trace_hash"] == fine.summary["trace_hash"]


def test_every_ping_is_answered_across_1000_nodes_in_a_lossless_network():
    result = run_ping(
        nodes=1000,
        duration_s=10.0,
        network__latency_model="euclidean",
        network__base_latency_ms=10.0,
        network__latency_scale_ms=100.0,
        network__jitter_ms=2.0,
    )
    summary = result.summary
    runner = result.runner
    assert summary["pings_timed_out"] == 0
    assert summary["messages_dropped_loss"] == summary["messages_dropped_down"] == 0
    for address in range(1000):
        sent = runner.sent(address)
        answered = runner.answered[address]
        assert sent >= 9
        assert sent - answered <= 1  # at most the last ping is still in flight at the end
    assert summary["pings_answered"] + summary["pings_in_flight"] == summary["pings_sent"]
    assert summary["rtt_median_ms"] == pytest.approx(summary["modelled_rtt_median_ms"], rel=0.05)


def test_constant_latency_gives_an_rtt_of_twice_the_latency():
    summary = run_ping(nodes=100, duration_s=5.0, network__latency_model="constant", network__base_latency_ms=30.0).summary
    assert summary["rtt_median_ms"] == pytest.approx(60.0)
    assert summary["rtt_p99_ms"] == pytest.approx(60.0)


def test_loss_makes_pings_time_out_in_proportion():
    summary = run_ping(nodes=200, duration_s=20.0, network__loss=0.1, network__latency_model="constant").summary
    lost_fraction = 1 - 0.9 * 0.9  # a ping or its pong
    assert summary["pings_timed_out"] / summary["pings_sent"] == pytest.approx(lost_fraction, abs=0.03)
    assert summary["answer_ratio"] == pytest.approx(1 - lost_fraction, abs=0.03)


def test_churned_nodes_lose_their_pings_and_rejoin_with_the_same_id():
    result = run_ping(seed=4, **{**NOISY, "network__loss": 0.0})
    summary = result.summary
    assert summary["departures"] > 100 and summary["arrivals"] > 50
    assert summary["messages_dropped_down"] > 0
    assert summary["pings_timed_out"] > 0
    assert summary["pings_sent"] == (
        summary["pings_answered"] + summary["pings_timed_out"] + summary["pings_abandoned"] + summary["pings_in_flight"]
    )
    rejoined = next(host for host in result.sim.hosts if host.incarnation > 1 and host.up)
    assert result.runner.pings[rejoined.address].node_id == result.runner.node_ids[rejoined.address]


def test_a_churn_trace_takes_the_listed_nodes_down_and_back(tmp_path):
    (tmp_path / "trace.csv").write_text("time_s,node,state\n2,0,down\n2,1,down\n6,1,up\n")
    scenario = parse_scenario(
        {"nodes": 20, "duration_s": 8.0, "churn": {"model": "trace", "trace_file": "trace.csv"}},
        base_dir=tmp_path,
    )
    result = run_scenario(scenario)
    assert result.summary["departures"] == 2 and result.summary["arrivals"] == 1
    assert [host.up for host in result.sim.hosts[:3]] == [False, True, True]
    up_series = [row["nodes_up"] for _, row in result.sim.metrics.series]
    assert up_series[0] == 20 and min(up_series) == 18 and up_series[-1] == 19


def test_the_trace_hash_does_not_depend_on_the_process_hash_seed():
    code = (
        "from p2pdeploy.sim.scenario import parse_scenario, run_scenario;"
        "s = parse_scenario({'nodes': 60, 'duration_s': 5.0, 'network': {'loss': 0.05, 'jitter_ms': 3.0},"
        " 'churn': {'model': 'sessions', 'session': {'median_s': 2.0}, 'downtime': {'median_s': 1.0}}});"
        "print(run_scenario(s).summary['trace_hash'])"
    )
    hashes = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        hashes.add(done.stdout.strip())
    assert len(hashes) == 1


def test_churn_waits_for_its_start_time():
    result = run_ping(
        nodes=100,
        duration_s=20.0,
        churn__model="sessions",
        churn__start_s=10.0,
        churn__session={"distribution": "exponential", "median_s": 2.0},
        churn__downtime={"distribution": "exponential", "median_s": 2.0},
    )
    nodes_up = {round(now): row["nodes_up"] for now, row in result.sim.metrics.series}
    assert all(nodes_up[t] == 100 for t in range(11))
    assert min(nodes_up[t] for t in range(12, 21)) < 90
