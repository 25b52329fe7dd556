"""The supervisor by hand: feed it executor reports and timers, read its commands and states."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy.fabric.executor import (
    REASON_KILLED,
    REASON_MEMORY,
    HealthCheck,
    HealthResult,
    InstallBundle,
    Installed,
    ProcessExited,
    ProcessFailedToStart,
    ProcessSpec,
    ProcessStarted,
    RunHealthCheck,
    SignalProcess,
    StartProcess,
)
from p2pdeploy.fabric.supervisor import (
    TRANSITIONS,
    FetchBundle,
    ReplicaSpec,
    ReplicaState,
    ReplicaStateChanged,
    RestartPolicy,
    Supervisor,
)

S = ReplicaState
HTTP = HealthCheck(kind="http", interval_s=5, timeout_s=1, failures=3, start_period_s=30, start_interval_s=0.5)


def make(health=HTTP, restart=None, grace_s=10.0, rng=None):
    process = ProcessSpec("web-1", 1, ("python3", "app.py"), port=8080)
    spec = ReplicaSpec(process, health, restart or RestartPolicy(backoff_initial_s=1, backoff_max_s=8), grace_s)
    return Supervisor(spec, rng)


def drain(sup):
    events = []
    while (event := sup.next_event()) is not None:
        events.append(event)
    return events


def commands(events):
    return [e for e in events if not isinstance(e, ReplicaStateChanged)]


def states(events):
    return [(e.new.value, e.reason) for e in events if isinstance(e, ReplicaStateChanged)]


def running(sup, now=0.0):
    """Start ``sup`` and bring it to running through install, start and one passing check."""
    sup.start(now, b"bundle")
    sup.report(Installed("web-1", True), now)
    sup.report(ProcessStarted("web-1", 1, 4242, 8080), now)
    sup.handle_timer(sup.next_deadline())
    sup.report(HealthResult("web-1", 1, True, "HTTP 200"), now + 0.6)
    drain(sup)
    assert sup.state is S.RUNNING
    return sup


def test_a_replica_goes_through_installing_and_starting_to_running_at_its_first_passing_check():
    sup = make()
    sup.start(0.0, b"bundle")
    assert commands(drain(sup)) == [InstallBundle("web-1", b"bundle")]
    sup.report(Installed("web-1", True), 1.0)
    start = commands(drain(sup))
    assert [type(c) for c in start] == [StartProcess] and start[0].spec.run == 1
    sup.report(ProcessStarted("web-1", 1, 4242, 8080), 1.1)
    assert sup.next_deadline() == 1.6  # checked every start_interval_s while starting
    sup.handle_timer(1.6)
    assert commands(drain(sup)) == [RunHealthCheck("web-1", 1, HTTP, 8080)]
    sup.report(HealthResult("web-1", 1, False, "connection refused"), 1.7)
    assert sup.state is S.STARTING  # failures during the start period do not count
    sup.handle_timer(sup.next_deadline())
    sup.report(HealthResult("web-1", 1, True, "HTTP 200"), 2.3)
    assert sup.state is S.RUNNING and sup.healthy
    assert str(sup.status()) == "running: healthy"


def test_without_a_bundle_the_replica_waits_in_fetching():
    sup = make()
    sup.start(0.0)
    events = drain(sup)
    assert states(events) == [("fetching", "waiting for the bundle")]
    assert isinstance(commands(events)[0], FetchBundle)
    sup.bundle_fetched(b"bundle", 1.0)
    assert sup.state is S.INSTALLING


def test_a_failed_install_leaves_the_replica_failed_with_the_reason():
    sup = make()
    sup.start(0.0, b"bundle")
    sup.report(Installed("web-1", False, "bundle: member '../x' escapes the bundle with '..'"), 0.5)
    assert str(sup.status()) == "failed: install: bundle: member '../x' escapes the bundle with '..'"
    assert sup.finished


def test_consecutive_failed_checks_make_a_running_replica_unhealthy_and_it_is_restarted():
    sup = running(make())
    now = 1.0
    for attempt in range(3):
        now = sup.next_deadline()
        sup.handle_timer(now)
        drain(sup)
        sup.report(HealthResult("web-1", 1, False, "HTTP GET /health answered 500"), now + 0.1)
        if attempt < 2:
            assert sup.state is S.RUNNING
    events = drain(sup)
    assert states(events) == [("failed", "unhealthy: 3 health checks failed in a row (HTTP GET /health answered 500)")]
    assert commands(events) == [SignalProcess("web-1", 1, "TERM")]
    sup.report(ProcessExited("web-1", 1, None, "TERM", "stopped by TERM"), now + 0.5)
    assert sup.status().restart_at == now + 0.5 + 1.0  # the first backoff
    sup.handle_timer(now + 1.5)
    relaunch = commands(drain(sup))
    assert [c.spec.run for c in relaunch if isinstance(c, StartProcess)] == [2]
    assert sup.restarts == 1 and sup.state is S.STARTING


def test_a_passing_check_resets_the_count_of_failures():
    sup = running(make())
    for ok in (False, False, True, False, False):
        now = sup.next_deadline()
        sup.handle_timer(now)
        sup.report(HealthResult("web-1", 1, ok, ""), now)
    assert sup.state is S.RUNNING


def test_a_replica_that_never_becomes_healthy_fails_at_the_end_of_its_start_period():
    sup = make()
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    sup.report(ProcessStarted("web-1", 1, 1, 8080), 0.0)
    now = 0.0
    while sup.state is S.STARTING:
        now = sup.next_deadline()
        sup.handle_timer(now)
        if any(isinstance(c, RunHealthCheck) for c in commands(drain(sup))):
            sup.report(HealthResult("web-1", 1, False, "connection to port 8080 refused"), now)
    assert now == 30.0
    assert sup.reason == "unhealthy: not healthy 30 s after starting (connection to port 8080 refused)"


def test_restarts_back_off_exponentially_up_to_the_cap_and_give_up_after_too_many_in_the_window():
    policy = RestartPolicy(backoff_initial_s=1, backoff_max_s=4, backoff_factor=2, max_restarts=4, window_s=1000)
    sup = make(health=HealthCheck(), restart=policy)
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    delays = []
    now = 0.0
    for run in range(1, 6):
        sup.report(ProcessStarted("web-1", run, 100 + run, 8080), now)
        sup.report(ProcessExited("web-1", run, 1, None, "exited with code 1"), now)
        restart_at = sup.status().restart_at
        if restart_at is None:
            break
        delays.append(restart_at - now)
        now = restart_at
        sup.handle_timer(now)
    assert delays == [1, 2, 4, 4]
    assert str(sup.status()) == "failed: exited with code 1; gave up after 4 restarts in 1000 s"
    assert sup.finished


def test_restarts_outside_the_window_do_not_count_against_the_limit():
    policy = RestartPolicy(backoff_initial_s=1, backoff_max_s=1, max_restarts=1, window_s=10)
    sup = make(health=HealthCheck(), restart=policy)
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    now = 0.0
    for run in (1, 2, 3):
        sup.report(ProcessStarted("web-1", run, run, 8080), now)
        now += 60  # a long, healthy run between crashes
        sup.report(ProcessExited("web-1", run, None, "KILL", REASON_MEMORY), now)
        assert sup.status().restart_at == now + 1
        now += 1
        sup.handle_timer(now)
    assert sup.restarts == 3


def test_with_restart_never_a_crash_leaves_the_replica_failed_with_its_reason():
    sup = make(health=HealthCheck(), restart=RestartPolicy(mode="never"))
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    sup.report(ProcessStarted("web-1", 1, 7, 8080), 0.0)
    assert sup.state is S.RUNNING  # no health check: running once started
    sup.report(ProcessExited("web-1", 1, None, "KILL", REASON_MEMORY), 3.0)
    assert str(sup.status()) == "failed: memory limit"
    assert sup.finished and sup.next_deadline() is None


def test_a_clean_exit_stops_the_replica_unless_the_policy_is_always():
    for mode, expected in (("on-failure", S.STOPPED), ("never", S.STOPPED), ("always", S.FAILED)):
        sup = make(health=HealthCheck(), restart=RestartPolicy(mode=mode))
        sup.start(0.0, b"b")
        sup.report(Installed("web-1", True), 0.0)
        sup.report(ProcessStarted("web-1", 1, 7, 8080), 0.0)
        sup.report(ProcessExited("web-1", 1, 0, None, "exited with code 0"), 1.0)
        assert sup.state is expected, mode
        assert (sup.status().restart_at is not None) == (mode == "always")


def test_stop_sends_term_then_kill_after_the_grace_period():
    sup = running(make(grace_s=10))
    sup.stop(100.0)
    events = drain(sup)
    assert states(events) == [("stopping", "stop requested")]
    assert commands(events) == [SignalProcess("web-1", 1, "TERM")]
    assert sup.next_deadline() == 110.0
    sup.handle_timer(110.0)
    assert commands(drain(sup)) == [SignalProcess("web-1", 1, "KILL")]
    sup.report(ProcessExited("web-1", 1, None, "KILL", REASON_KILLED), 110.1)
    assert str(sup.status()) == "stopped: killed after the 10 s grace period"
    assert sup.finished


def test_a_service_that_exits_on_term_is_stopped_without_kill():
    sup = running(make())
    sup.stop(100.0)
    drain(sup)
    sup.report(ProcessExited("web-1", 1, None, "TERM", "stopped by TERM"), 100.2)
    assert str(sup.status()) == "stopped: stopped by TERM"
    assert sup.next_deadline() is None


def test_a_stop_before_the_process_reported_its_start_terminates_it_when_it_does():
    sup = make()
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    drain(sup)
    sup.stop(0.1)
    assert commands(drain(sup)) == []
    sup.report(ProcessStarted("web-1", 1, 9, 8080), 0.2)
    assert commands(drain(sup)) == [SignalProcess("web-1", 1, "TERM")]


def test_stopping_a_failed_replica_waiting_to_restart_cancels_the_restart():
    sup = make(health=HealthCheck())
    sup.start(0.0, b"b")
    sup.report(Installed("web-1", True), 0.0)
    sup.report(ProcessFailedToStart("web-1", 1, "cannot run 'x': command not found"), 0.0)
    assert sup.status().restart_at is not None
    sup.stop(0.5)
    assert sup.state is S.STOPPED and sup.next_deadline() is None


def test_reports_of_an_earlier_run_are_ignored():
    sup = running(make())
    sup.report(ProcessExited("web-1", 0, 1, None, "exited with code 1"), 5.0)
    sup.report(HealthResult("web-1", 7, False, "x"), 5.0)
    assert sup.state is S.RUNNING
    assert sup.dropped["stale_report"] == 2


def test_the_executor_never_answering_after_kill_still_ends_in_stopped():
    sup = running(make(grace_s=1))
    sup.stop(10.0)
    sup.handle_timer(11.0)
    sup.handle_timer(sup.next_deadline())
    assert str(sup.status()) == "stopped: did not exit after KILL"


# -- every move the supervisor makes is in the table, whatever the executor reports ------------

REPORT_KINDS = ("installed_ok", "installed_bad", "started", "exited_ok", "exited_bad", "failed_to_start", "healthy",
                "unhealthy", "timer", "stop")  # fmt: skip


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(REPORT_KINDS), st.integers(0, 3)), max_size=40), st.integers(0, 2**32))
def test_every_move_follows_the_transition_table_whatever_happens(steps, seed):
    sup = make(restart=RestartPolicy(max_restarts=3, backoff_initial_s=0.5, backoff_max_s=2), grace_s=1, rng=random.Random(seed))
    sup.start(0.0, b"b")
    now = 0.0
    events = drain(sup)
    for kind, run_offset in steps:
        now += 0.3
        run = max(0, sup.run - run_offset % 2)
        if kind == "installed_ok":
            sup.report(Installed("web-1", True), now)
        elif kind == "installed_bad":
            sup.report(Installed("web-1", False, "bad"), now)
        elif kind == "started":
            sup.report(ProcessStarted("web-1", run, 10 + run, 8080), now)
        elif kind == "exited_ok":
            sup.report(ProcessExited("web-1", run, 0, None, "exited with code 0"), now)
        elif kind == "exited_bad":
            sup.report(ProcessExited("web-1", run, None, "KILL", REASON_KILLED), now)
        elif kind == "failed_to_start":
            sup.report(ProcessFailedToStart("web-1", run, "nope"), now)
        elif kind in ("healthy", "unhealthy"):
            sup.report(HealthResult("web-1", run, kind == "healthy", ""), now)
        elif kind == "timer":
            deadline = sup.next_deadline()
            if deadline is not None:
                now = max(now, deadline)
                sup.handle_timer(now)
        else:
            sup.stop(now)
        events += drain(sup)
    for event in events:
        if isinstance(event, ReplicaStateChanged):
            assert event.new in TRANSITIONS[event.old], event
    signals = [e for e in events if isinstance(e, SignalProcess)]
    assert all(s.run >= 1 for s in signals)
    if sup.finished:
        assert sup.state in (S.STOPPED, S.FAILED)
