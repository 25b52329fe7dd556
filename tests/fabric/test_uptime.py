"""The uptime history: sessions, crashes that cost at most one heartbeat, bounded size, stored form."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.fabric.uptime import Session, UptimeHistory

DAY = 86400.0

#: One step of a node's life: ("begin" | "heartbeat" | "end", seconds since the previous step).
steps = st.lists(
    st.tuples(st.sampled_from(["begin", "heartbeat", "heartbeat", "end"]), st.floats(0, 7200)),
    max_size=60,
)


def replay(ops: list[tuple[str, float]], max_sessions: int = 1000, t0: float = 1.7e9) -> tuple[UptimeHistory, float]:
    history = UptimeHistory(max_sessions=max_sessions)
    now = t0
    for op, dt in ops:
        now += dt
        {"begin": history.begin, "heartbeat": history.record_heartbeat, "end": history.end}[op](now)
    return history, now


def total_up(history: UptimeHistory, now: float) -> float:
    current = 0.0 if history.current_start_s is None else now - history.current_start_s
    return sum(s.up_s for s in history.sessions) + current


@given(steps, st.floats(0, 3 * DAY), st.floats(1, 60 * DAY))
def test_availability_is_a_fraction_or_unknown(ops, later, window):
    history, now = replay(ops)
    value = history.availability(now + later, window)
    assert value is None or 0.0 <= value <= 1.0


@given(steps, st.integers(1, 5))
def test_sessions_stay_bounded_and_merging_keeps_the_uptime(ops, max_sessions):
    bounded, now = replay(ops, max_sessions=max_sessions)
    unbounded, _ = replay(ops)
    assert len(bounded.sessions) <= max_sessions
    assert total_up(bounded, now) == pytest.approx(total_up(unbounded, now), rel=1e-9, abs=1e-6)
    assert bounded.first_start_s() == unbounded.first_start_s()
    for earlier, later in pairwise(bounded.sessions):
        assert earlier.end_s <= later.start_s
    if now - (bounded.first_start_s() or now) < 30 * DAY:  # the window holds it all: merging changes nothing
        assert bounded.availability(now) == pytest.approx(unbounded.availability(now))


@given(steps, st.floats(0, DAY))
def test_the_stored_form_round_trips_through_json(ops, later):
    history, now = replay(ops)
    data = json.loads(json.dumps(history.to_dict()))
    again = UptimeHistory.from_dict(data)
    assert again.to_dict() == history.to_dict()
    assert again.availability(now + later) == history.availability(now + later)


def test_a_crash_counts_as_down_from_the_last_heartbeat_to_the_restart():
    history = UptimeHistory()
    history.begin(1000.0)
    for t in range(1060, 1000 + 3600 + 1, 60):  # an hour of heartbeats, the last at 4600
        history.record_heartbeat(float(t))
    # the process dies at 4650 (50 s after its last heartbeat) and starts again at 8200
    history.begin(8200.0)
    assert history.sessions == (Session(1000.0, 4600.0, 3600.0),)
    assert history.current_start_s == 8200.0
    # up 3,600 s of the 7,200 s until 8,200, then up 3,600 s more
    assert history.availability(11800.0) == pytest.approx(7200.0 / 10800.0)


def test_a_clean_stop_closes_the_session_where_it_stopped():
    history = UptimeHistory()
    history.begin(0.0)
    history.record_heartbeat(60.0)
    history.end(90.0)
    history.begin(190.0)
    assert history.sessions == (Session(0.0, 90.0, 90.0),)
    assert history.availability(290.0) == pytest.approx(190.0 / 290.0)


def test_availability_is_unknown_with_too_little_history_and_looks_at_the_window_only():
    history = UptimeHistory()
    assert history.availability(0.0) is None
    history.begin(0.0)
    assert history.availability(59.0) is None
    assert history.availability(60.0) == 1.0
    history.end(10 * DAY)
    history.begin(40 * DAY)  # down for 30 days
    assert history.availability(40 * DAY + 60, window_s=30 * DAY) == pytest.approx(60 / (30 * DAY))
    assert history.availability(40 * DAY + 60, window_s=50 * DAY) == pytest.approx((10 * DAY + 60) / (40 * DAY + 60))


def test_a_clock_stepping_back_never_makes_sessions_overlap():
    history = UptimeHistory()
    history.begin(1000.0)
    history.record_heartbeat(1600.0)
    history.record_heartbeat(1500.0)  # NTP stepped back: the heartbeat at 1600 stands
    history.begin(1200.0)
    assert history.sessions == (Session(1000.0, 1600.0, 600.0),)
    assert history.current_start_s == 1600.0


@pytest.mark.parametrize(("data", "message"), [
    ([], "must be a mapping"),
    ({"version": 2, "sessions": []}, "version must be 1"),
    ({"version": 1, "sessions": [[0, 10]]}, r"sessions\[0\] must be \[start_s, end_s, up_s\]"),
    ({"version": 1, "sessions": [[10, 0, 0]]}, r"sessions\[0\]: session end_s must be >= start_s"),
    ({"version": 1, "sessions": [[0, 10, 11]]}, r"sessions\[0\]: session up_s must be in"),
    ({"version": 1, "sessions": [[0, 10, 10], [5, 20, 15]]}, r"sessions\[1\] starts before sessions\[0\] ends"),
    ({"version": 1, "sessions": [], "current_start_s": 5.0, "last_heartbeat_s": None}, "both be set"),
    ({"version": 1, "sessions": [], "current_start_s": 5.0, "last_heartbeat_s": 1.0}, "last_heartbeat_s must be >="),
    ({"version": 1, "sessions": [], "current_start_s": float("nan"), "last_heartbeat_s": 1.0}, "finite"),
])
def test_a_corrupt_stored_form_is_refused_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        UptimeHistory.from_dict(data)
