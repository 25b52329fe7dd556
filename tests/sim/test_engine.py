"""The event heap: ordering, the clock, run(until=), named streams and the trace hash."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.sim.engine import NORMAL, URGENT, EmptySchedule, Engine, Streams

times = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.25]) | st.floats(0, 10), max_size=60)


@given(times)
def test_events_pop_in_time_then_insertion_order(schedule_times):
    engine = Engine()
    ran = []
    for index, at in enumerate(schedule_times):
        engine.schedule(at, ran.append, (at, index))
    engine.run()
    assert ran == sorted(ran)  # (time, insertion index): same-time events in insertion order
    assert len(ran) == len(schedule_times)


@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from([URGENT, NORMAL])), max_size=40))
def test_priority_orders_same_time_events_before_insertion_order(entries):
    engine = Engine()
    ran = []
    for index, (at, priority) in enumerate(entries):
        engine.schedule_with_priority(at, priority, ran.append, (at, priority, index))
    engine.run()
    assert ran == sorted(ran)


@given(times, st.lists(st.floats(0, 12), max_size=5))
def test_running_in_chunks_processes_the_same_events_in_the_same_order(schedule_times, stops):
    def build():
        engine = Engine()
        ran = []
        for index, at in enumerate(schedule_times):
            engine.schedule(at, ran.append, index)
        return engine, ran

    whole, whole_ran = build()
    whole.run()
    chunked, chunked_ran = build()
    for stop in sorted(stops):
        chunked.run(until=stop)
    chunked.run()
    assert chunked_ran == whole_ran
    assert chunked.trace_hash == whole.trace_hash


def test_events_scheduled_by_events_run_at_their_time():
    engine = Engine()
    log = []

    def tick(n):
        log.append((engine.now, n))
        if n < 3:
            engine.call_later(0.5, tick, n + 1)

    engine.schedule(1.0, tick, 0)
    assert engine.run() == 4
    assert log == [(1.0, 0), (1.5, 1), (2.0, 2), (2.5, 3)]
    assert engine.events == 4


def test_run_until_leaves_events_at_that_time_and_advances_the_clock():
    engine = Engine()
    ran = []
    engine.schedule(1.0, ran.append, "a")
    engine.schedule(2.0, ran.append, "b")
    assert engine.run(until=2.0) == 1
    assert ran == ["a"]
    assert engine.now == 2.0
    assert engine.peek() == 2.0
    engine.run(until=5.0)
    assert ran == ["a", "b"]
    assert engine.now == 5.0


def test_peek_step_and_empty_schedule():
    engine = Engine()
    assert engine.peek() == math.inf
    with pytest.raises(EmptySchedule):
        engine.step()
    engine.schedule(0.25, lambda: None)
    assert engine.peek() == 0.25
    engine.step()
    assert engine.now == 0.25
    assert engine.pending() == 0


def test_scheduling_in_the_past_is_local_misuse():
    engine = Engine()
    engine.schedule(1.0, lambda: None)
    engine.run()
    with pytest.raises(ValueError, match="before the current time"):
        engine.schedule(0.5, lambda: None)
    with pytest.raises(ValueError, match="delay must be >= 0"):
        engine.call_later(-1, lambda: None)


def _traced_run(delays, label="x"):
    engine = Engine()

    def event(name, n):
        pass

    for n, delay in enumerate(delays):
        engine.schedule(delay, event, label, n)
    engine.run()
    return engine.trace_hash


def test_trace_hash_is_equal_for_equal_runs_and_differs_otherwise():
    assert _traced_run([1.0, 2.0, 3.0]) == _traced_run([1.0, 2.0, 3.0])
    assert _traced_run([1.0, 2.0, 3.0]) != _traced_run([1.0, 2.0, 3.5])
    assert _traced_run([1.0, 2.0]) != _traced_run([1.0, 2.0], label="y")
    assert Engine(trace=False).trace_hash == ""


def test_trace_hash_does_not_depend_on_the_hashing_batch():
    delays = [i * 0.001 for i in range(10_000)]  # more than one batch
    first = _traced_run(delays)
    assert first == _traced_run(delays)
    assert first != _traced_run(delays[:-1])


def test_reading_the_trace_hash_mid_run_does_not_change_the_final_hash():
    def run(read_along_the_way):
        engine = Engine()
        for n in range(10_000):  # more than one hashing batch
            engine.schedule(n * 0.001, lambda n: None, n)
        for stop in (0.5, 4.1, 7.0):
            engine.run(until=stop)
            if read_along_the_way:
                assert len(engine.trace_hash) == 64
        engine.run()
        return engine.trace_hash

    assert run(read_along_the_way=True) == run(read_along_the_way=False)


def test_trace_names_messages_by_type_not_by_repr():
    class Message:  # its default repr holds a memory address, which must not reach the hash
        pass

    def run():
        engine = Engine()
        engine.schedule(1.0, lambda message: None, Message())
        engine.run()
        return engine.trace_hash

    assert run() == run()


def test_streams_are_reproducible_and_independent_of_each_other():
    first = Streams(7)
    a = [first.get("node", 3).random() for _ in range(3)]
    second = Streams(7)
    second.get("network").random()  # another stream in use does not shift node 3's draws
    second.get("node", 2).random()
    assert [second.get("node", 3).random() for _ in range(3)] == a
    assert Streams(8).get("node", 3).random() != a[0]
    assert first.get("node", 3) is first.get("node", 3)
    assert Streams(7).fresh("node", 3).random() == a[0]
    assert Streams(7).bytes("identity", 1) == Streams(7).bytes("identity", 1)
    assert len(Streams(7).bytes("identity", 1, size=80)) == 80
    assert Streams(7).bytes("identity", 1) != Streams(7).bytes("identity", 2)
