"""``p2pdeploy simulate``: the summary table, --json, --out, and clean errors."""

import csv
import json
import tomllib
from pathlib import Path

from click.testing import CliRunner

from p2pdeploy.cli import main
from p2pdeploy.sim.scenario import load_scenario, run_scenario

PING_TOML = str(Path(__file__).parents[2] / "simulations" / "ping.toml")
SMALL = ["--set", "nodes=100", "--set", "duration_s=5"]


def simulate(*args):
    return CliRunner().invoke(main, ["simulate", *args], catch_exceptions=False)


def test_simulate_ping_toml_with_json_prints_the_summary_as_its_last_line():
    result = simulate(PING_TOML, "--json")
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("nodes", "events", "events_per_second", "trace_hash", "rtt_median_ms"):
        assert key in summary
    assert summary["nodes"] == 1000
    assert summary["answer_ratio"] > 0.99
    assert "trace_hash" in result.stdout.split(last)[0]  # the table came first


def test_seed_and_set_options_reach_the_run():
    first = json.loads(simulate(PING_TOML, "--json", "--seed", "5", *SMALL).stdout.splitlines()[-1])
    second = json.loads(simulate(PING_TOML, "--json", "--seed", "6", *SMALL).stdout.splitlines()[-1])
    assert first["seed"] == 5 and first["nodes"] == 100 and first["duration_s"] == 5.0
    assert first["trace_hash"] != second["trace_hash"]


def test_out_writes_csv_json_lines_and_the_resolved_scenario(tmp_path):
    out = tmp_path / "results"
    result = simulate(PING_TOML, "--json", "--out", str(out), *SMALL, "--set", "metrics.sample_interval_s=1")
    assert result.exit_code == 0, result.output
    names = {path.name for path in out.iterdir()}
    assert {"summary.json", "scenario.toml", "scenario.json", "timeseries.csv", "timeseries.jsonl"} <= names
    assert {"nodes.csv", "nodes.jsonl"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(result.stdout.splitlines()[-1])
    series = list(csv.DictReader((out / "timeseries.csv").open()))
    assert [row["time_s"] for row in series] == ["0.0", "1.0", "2.0", "3.0", "4.0", "5.0"]
    assert int(series[-1]["pings_answered"]) == summary["pings_answered"]
    first_line = json.loads((out / "timeseries.jsonl").read_text().splitlines()[0])
    assert first_line["time_s"] == 0.0 and first_line["nodes_up"] == 100
    resolved = tomllib.loads((out / "scenario.toml").read_text())
    assert resolved == json.loads((out / "scenario.json").read_text())
    assert resolved["nodes"] == 100 and resolved["network"]["upload_bytes_per_s"] == 1_250_000.0

    rerun = run_scenario(load_scenario(out / "scenario.toml"))  # the resolved file reproduces the run
    assert rerun.summary["trace_hash"] == summary["trace_hash"]


def test_a_bad_value_exits_with_status_2_and_a_message_naming_the_key():
    result = simulate(PING_TOML, "--set", "network.loss=1.5")
    assert result.exit_code == 2
    assert "ping.toml --set: network.loss must be between 0 and 1 (got 1.5)" in result.stderr
    assert "Traceback" not in result.output


def test_an_unknown_key_in_the_file_exits_with_status_2(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('protocol = "ping"\n[network]\nlos = 0.1\n')
    result = simulate(str(path))
    assert result.exit_code == 2
    assert "typo.toml: unknown key network.los (did you mean network.loss?)" in result.stderr
