"""The simulator's driver contract: drain events, then messages, then re-arm one timer."""

import pytest

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.ping import Ping, PingProtocol, PongReceived
from p2pdeploy.sim.host import NodeDown
from p2pdeploy.sim.network import NetworkConfig
from p2pdeploy.sim.simulation import Simulation


class Alarm(Protocol):
    """Fires named timers, reports each as an event, and echoes pings as a second timer."""

    handles = (Ping,)

    def __init__(self):
        super().__init__()
        self.fired = []

    def receive(self, src, msg, now):
        self.emit(("received", src, msg.nonce, now))

    def on_timer(self, name, now):
        self.fired.append((name, now))
        self.emit(("fired", name, now))


def simulation(nodes=2):
    events = []
    sim = Simulation(
        nodes,
        network=NetworkConfig(latency_model="constant", base_latency_ms=10),
        observer=lambda address, event: events.append((address, event)),
    )
    return sim, events


def test_a_timer_fires_at_its_deadline_and_its_events_reach_the_observer():
    sim, events = simulation()
    alarm = Alarm()
    sim.hosts[0].start(alarm)
    sim.hosts[0].call(lambda core, now: core.set_timer("wake", 2.5))
    sim.run()
    assert alarm.fired == [("wake", 2.5)]
    assert events == [(0, ("fired", "wake", 2.5))]


def test_a_moved_timer_fires_once_at_its_new_deadline_and_the_old_wakeup_is_ignored():
    sim, _ = simulation()
    alarm = Alarm()
    host = sim.hosts[0]
    host.start(alarm)
    host.call(lambda core, now: core.set_timer("wake", 1.0))
    host.call(lambda core, now: core.set_timer("wake", 3.0))  # later: the 1.0 wakeup goes stale
    sim.run()
    assert alarm.fired == [("wake", 3.0)]
    assert host.stale_timers == 1

    host.call(lambda core, now: core.set_timer("again", now + 5.0))
    host.call(lambda core, now: core.set_timer("again", now + 1.0))  # earlier: armed again
    sim.run()
    assert alarm.fired[-1] == ("again", 4.0)


def test_a_deadline_in_the_past_fires_now_with_the_current_clock():
    sim, _ = simulation()
    alarm = Alarm()
    host = sim.hosts[0]
    host.start(alarm)
    sim.run(until=10.0)
    host.call(lambda core, now: core.set_timer("late", 4.0))
    sim.run()
    assert alarm.fired == [("late", 10.0)]  # max(deadline, clock): never an early time


def test_a_crash_discards_the_core_its_timers_and_its_messages():
    sim, events = simulation()
    host = sim.hosts[1]
    host.start(Alarm())
    host.call(lambda core, now: core.set_timer("wake", 1.0))
    lost = host.crash()
    assert not host.up and isinstance(lost, Alarm)
    sim.hosts[0].start(Alarm())
    sim.hosts[0].call(lambda core, now: core.send(1, Ping(9, 0)))
    sim.run()
    assert lost.fired == []
    assert sim.network.dropped["down"] == 1
    with pytest.raises(NodeDown):
        host.call(lambda core, now: None)


def test_a_rejoined_node_hosts_a_new_core_and_receives_again():
    sim, events = simulation()
    sim.hosts[0].start(Alarm())
    sim.hosts[1].start(Alarm())
    sim.hosts[1].crash()
    fresh = Alarm()
    sim.hosts[1].start(fresh)
    assert sim.hosts[1].incarnation == 2
    sim.hosts[0].call(lambda core, now: core.send(1, Ping(3, 0)))
    sim.run()
    assert events == [(1, ("received", 0, 3, pytest.approx(0.010)))]
    with pytest.raises(RuntimeError, match="already up"):
        sim.hosts[1].start(Alarm())


def test_ping_protocol_in_a_stack_measures_the_modelled_round_trip():
    sim, events = simulation()
    for host in sim.hosts:
        ping = PingProtocol(100 + host.address, sim.streams.fresh("node", host.address), own_address=host.address)
        host.start(Stack([ping]))
    nonce = sim.hosts[0].call(lambda core, now: core.layer(PingProtocol).ping(1, now))
    sim.run()
    pongs = [event for address, event in events if isinstance(event, PongReceived)]
    assert [(p.nonce, p.node_id) for p in pongs] == [(nonce, 101)]
    assert pongs[0].rtt_s == pytest.approx(0.020)


def test_a_paused_node_that_crashes_does_not_come_back_on_resume():
    sim = Simulation(2, seed=1)
    node = sim.hosts[0]
    node.start(_Idle())
    node.pause()
    assert node.crash() is not None  # the paused core is the one discarded
    with pytest.raises(RuntimeError, match="not paused"):
        node.resume()
    assert not node.up


class _Idle(Protocol):
    def receive(self, src, msg, now):
        pass

    def on_timer(self, name, now):
        pass
