"""Metrics: counters, gauges and distributions, sampled into global and per-node series."""

import csv
import json

from p2pdeploy.sim.metrics import Metrics


def test_samples_record_counters_gauges_and_per_node_values(tmp_path):
    metrics = Metrics(3)
    pongs = metrics.node_counter("pongs")
    level = {"value": 1.5}
    metrics.gauge("level", lambda: level["value"])
    metrics.node_gauge("double", lambda address: 2 * address if address else None)
    metrics.incr("rounds")
    pongs[1] += 2
    metrics.sample(0.0)
    metrics.incr("rounds", 4)
    pongs[2] += 1
    level["value"] = 3.0
    metrics.sample(1.0)

    assert metrics.series == [
        (0.0, {"rounds": 1, "level": 1.5, "pongs": 2}),
        (1.0, {"rounds": 5, "level": 3.0, "pongs": 3}),
    ]
    assert metrics.node_series[1] == (1.0, {"pongs": [0, 2, 1], "double": [None, 2, 4]})

    written = {path.name for path in metrics.write(tmp_path)}
    assert written == {"timeseries.csv", "timeseries.jsonl", "nodes.csv", "nodes.jsonl"}
    rows = list(csv.DictReader((tmp_path / "timeseries.csv").open()))
    assert rows[1] == {"time_s": "1.0", "rounds": "5", "level": "3.0", "pongs": "3"}
    lines = [json.loads(line) for line in (tmp_path / "nodes.jsonl").read_text().splitlines()]
    assert lines[-1] == {"time_s": 1.0, "node": 2, "pongs": 1, "double": 4}
    node_rows = list(csv.DictReader((tmp_path / "nodes.csv").open()))
    assert len(node_rows) == 6 and node_rows[0]["double"] == ""


def test_distributions_report_median_and_percentiles():
    metrics = Metrics(1)
    assert metrics.median("rtt_ms") is None
    for value in range(1, 101):
        metrics.observe("rtt_ms", float(value))
    assert metrics.median("rtt_ms") == 50.5
    assert metrics.percentile("rtt_ms", 0.9) == 90.0
    assert metrics.percentile("rtt_ms", 1.0) == 100.0


def test_per_node_sampling_can_be_turned_off(tmp_path):
    metrics = Metrics(1000, per_node=False)
    metrics.node_counter("x")[5] += 1
    metrics.sample(0.0)
    assert metrics.node_series == []
    assert {path.name for path in metrics.write(tmp_path)} == {"timeseries.csv", "timeseries.jsonl"}
