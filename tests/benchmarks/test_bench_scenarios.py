"""benchmarks/bench_scenarios.py: its tables and its reading of a run's output, on canned summaries."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scenarios.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scenarios", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()

OVERLAY_STATIC = {
    "scenario": "overlay-static",
    "protocol": "overlay",
    "nodes": 1000,
    "seed": 1,
    "lookup_success": 1.0,
    "exact_k_closest": 0.998,
    "hops_median": 2,
    "hops_p99": 3,
    "messages_per_lookup": 21.411,
    "log2_n": 9.966,
    "contacts_median": 90,
    "events": 324306,
    "events_per_second": 40400,
    "wall_s": 8.027,
    "process_wall_s": 8.7,
    "trace_hash": "6e811aa3c073c128",
}


def _rows(text: str) -> dict[str, list[str]]:
    """The table's body as {figure: [cells]}."""
    lines = text.splitlines()
    body = lines[4:-1]  # title, rule, header, rule ... rule
    return {line.split()[0]: line.split()[1:] for line in body}


def test_table_lists_the_scenarios_key_figures_then_the_runs_cost():
    text = bench.table("overlay-static", OVERLAY_STATIC)
    assert text.splitlines()[0] == "overlay-static: overlay, 1000 nodes, seed 1"
    rows = _rows(text)
    assert list(rows)[:6] == ["lookup_success", "exact_k_closest", "hops_median", "hops_p99",
                              "messages_per_lookup", "log2_n"]
    assert rows["exact_k_closest"] == ["0.998"]
    assert rows["messages_per_lookup"] == ["21.411"]
    assert rows["events"] == ["324,306"]
    assert rows["trace_hash"] == ["6e811aa3c073c128"]
    assert "contacts_median" not in rows  # not one of overlay-static's figures


def test_comparison_puts_before_after_and_their_ratio_side_by_side():
    after = {**OVERLAY_STATIC, "messages_per_lookup": 42.822, "events": 324306, "wall_s": 4.0135,
             "trace_hash": "0000000000000000"}
    rows = _rows(bench.table("overlay-static", after, OVERLAY_STATIC))
    assert rows["messages_per_lookup"] == ["21.411", "42.822", "2.000"]
    assert rows["events"] == ["324,306", "324,306", "1.000"]
    assert rows["trace_hash"] == ["6e811aa3c073c128", "0000000000000000", "differs"]
    same = _rows(bench.table("overlay-static", OVERLAY_STATIC, OVERLAY_STATIC))
    assert same["trace_hash"][-1] == "same"


def test_a_figure_missing_on_one_side_shows_a_dash():
    before = {key: value for key, value in OVERLAY_STATIC.items() if key != "hops_p99"}
    rows = _rows(bench.table("overlay-static", OVERLAY_STATIC, before))
    assert rows["hops_p99"] == ["-", "3", "-"]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [(2, 3, "1.500"), (0, 0, "1"), (0, 5, "-"), (None, 1, "-"), ("ab", "ab", "same"), (True, False, "differs")],
)
def test_ratio(before, after, expected):
    assert bench.ratio(before, after) == expected


def test_a_weibull_twin_shows_its_exponential_twins_figures():
    assert bench.keys_for("overlay-churn-weibull") == bench.KEYS["overlay-churn"]
    assert bench.keys_for("persistence-churn-weibull") == bench.KEYS["persistence-churn"]
    assert bench.keys_for("my-storage-test", {"protocol": "persistence"}) == bench.KEYS["persistence-churn"]
    assert bench.keys_for("my-ping-test", {"protocol": "ping"}) == ()


def test_default_list_names_existing_scenarios_with_figures_and_adds_the_weibull_twins():
    selected = dict(bench.scenario_paths([]))
    assert set(bench.DEFAULT_SCENARIOS) <= set(selected)
    assert {name for name in selected if name.endswith("-weibull")} == {
        path.stem for path in bench.SIMULATIONS.glob("*-weibull.toml")
    }
    for name, path in selected.items():
        assert path.is_file(), name
        assert bench.keys_for(name), name


def test_run_reads_the_last_line_of_stdout_and_passes_the_overrides(monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        stdout = "a table\n" + json.dumps({"protocol": "overlay", "lookup_success": 1.0}) + "\n\n"
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    summary = bench.run(Path("simulations/overlay-static.toml"), ["nodes=100"], seed=3)
    assert summary["lookup_success"] == 1.0
    assert summary["process_wall_s"] >= 0
    assert seen["command"][-5:] == ["--json", "--set", "nodes=100", "--seed", "3"]


def test_a_failed_run_raises_with_the_tail_of_its_stderr(monkeypatch):
    def fake_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 2, stdout="", stderr="Error: nodes must be >= 1 (got 0)\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="nodes must be >= 1"):
        bench.run(Path("x.toml"), [], seed=None)


def test_a_run_without_trace_hash_shows_a_dash_not_a_match():
    untraced = {**OVERLAY_STATIC, "trace_hash": ""}
    rows = _rows(bench.table("overlay-static", untraced, untraced))
    assert rows["trace_hash"] == ["-", "-", "-"]
