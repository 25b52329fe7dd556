"""Churn models: session and downtime distributions, the renewal process, trace files."""

import math
import random
import statistics

import pytest

from p2pdeploy.sim.churn import (
    ChurnTraceError,
    LengthDistribution,
    SessionChurn,
    TraceChurn,
    Transition,
    load_trace,
    parse_trace,
)
from p2pdeploy.sim.engine import Engine, Streams


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("exponential", 1.0), ("weibull", 0.5), ("weibull", 2.0), ("pareto", 0.8), ("pareto", 2.5)],
)
def test_length_distributions_have_the_configured_median(kind, shape):
    distribution = LengthDistribution(kind, median_s=120.0, shape=shape)
    rng = random.Random(42)
    samples = [distribution.sample(rng) for _ in range(20_000)]
    assert statistics.median(samples) == pytest.approx(120.0, rel=0.05)
    assert min(samples) > 0


def test_means_follow_from_median_and_shape():
    assert LengthDistribution("exponential", 10.0).mean_s == pytest.approx(10.0 / math.log(2))
    assert LengthDistribution("weibull", 10.0, shape=1.0).mean_s == pytest.approx(10.0 / math.log(2))
    assert LengthDistribution("pareto", 10.0, shape=1.0).mean_s == math.inf
    rng = random.Random(3)
    pareto = LengthDistribution("pareto", 10.0, shape=3.0)
    assert statistics.mean(pareto.sample(rng) for _ in range(50_000)) == pytest.approx(pareto.mean_s, rel=0.05)


def test_bad_distributions_are_refused():
    with pytest.raises(ValueError, match="distribution must be one of"):
        LengthDistribution("gamma", 10.0)
    with pytest.raises(ValueError, match="median_s must be > 0"):
        LengthDistribution("weibull", 0.0)


def test_session_churn_produces_the_configured_session_and_downtime_medians():
    engine = Engine(trace=False)
    nodes = 200
    went_down_at: dict[int, float] = {}
    came_up_at = dict.fromkeys(range(nodes), 0.0)
    sessions: list[float] = []
    downtimes: list[float] = []

    def on_down(address):
        sessions.append(engine.now - came_up_at.pop(address))
        went_down_at[address] = engine.now

    def on_up(address):
        downtimes.append(engine.now - went_down_at.pop(address))
        came_up_at[address] = engine.now

    churn = SessionChurn(
        engine,
        Streams(5),
        range(nodes),
        LengthDistribution("weibull", 10.0, shape=0.5),
        LengthDistribution("pareto", 4.0, shape=1.5),
        on_down=on_down,
        on_up=on_up,
    )
    churn.start()
    engine.run(until=2000.0)
    assert len(sessions) > 5_000
    assert statistics.median(sessions) == pytest.approx(10.0, rel=0.08)
    assert statistics.median(downtimes) == pytest.approx(4.0, rel=0.08)
    assert churn.departures == len(sessions) and churn.arrivals == len(downtimes)


def test_a_node_churns_the_same_whatever_the_population():
    def history(nodes):
        engine = Engine(trace=False)
        log = []
        churn = SessionChurn(
            engine,
            Streams(9),
            range(nodes),
            LengthDistribution("exponential", 5.0),
            LengthDistribution("exponential", 5.0),
            on_down=lambda a: log.append((engine.now, a, "down")),
            on_up=lambda a: log.append((engine.now, a, "up")),
        )
        churn.start()
        engine.run(until=100.0)
        return [entry for entry in log if entry[1] == 3]

    assert history(10) == history(50)


def test_trace_files_parse_with_header_comments_and_blank_lines():
    text = "time_s,node,state\n# a comment\n\n12.5, 3, down\n70,3,up  # back\n"
    assert parse_trace(text) == [Transition(12.5, 3, False), Transition(70.0, 3, True)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,2", "expected time_s,node,state"),
        ("soon,2,up", "time_s must be a number"),
        ("-1,2,up", "time_s must be >= 0"),
        ("1,two,up", "node must be an integer"),
        ("1,10,up", "node must be in 0..9"),
        ("1,2,sideways", "state must be up or down"),
    ],
)
def test_bad_trace_lines_name_the_file_and_line(line, message):
    with pytest.raises(ChurnTraceError, match=rf"churn\.csv:3: {message}"):
        parse_trace(["time_s,node,state", "0,1,down", line], source="churn.csv", nodes=10)


def test_loading_a_missing_trace_file_names_it(tmp_path):
    with pytest.raises(ChurnTraceError, match="missing.csv: cannot read churn trace"):
        load_trace(tmp_path / "missing.csv")


def test_trace_churn_applies_transitions_in_time_order_and_ignores_repeats(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("5,1,up\n1,1,down\n2,1,down\n3,0,down\n4,0,up\n")
    engine = Engine()
    log = []
    churn = TraceChurn(
        engine,
        load_trace(path, nodes=2),
        on_down=lambda a: log.append((engine.now, a, "down")),
        on_up=lambda a: log.append((engine.now, a, "up")),
    )
    churn.start()
    engine.run()
    assert log == [(1.0, 1, "down"), (3.0, 0, "down"), (4.0, 0, "up"), (5.0, 1, "up")]
    assert churn.ignored == 1


def test_a_trace_starts_at_the_churn_start_time():
    engine = Engine()
    log = []
    churn = TraceChurn(
        engine,
        [Transition(1.0, 0, False)],
        on_down=lambda a: log.append(engine.now),
        on_up=lambda a: None,
        start_s=30.0,
    )
    churn.start()
    engine.run()
    assert log == [31.0]
