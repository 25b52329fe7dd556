"""The failure detector: SWIM probing, Lifeguard's nacks, suspicion and local health, incarnations.

Unit tests drive detectors by hand on a fake link (every message goes through the wire codec);
whole-system tests run the ``detector`` scenario in the simulator: kills are detected, pauses
and loss convict no one.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.overlay.swim import (
    ALIVE,
    DEAD,
    MAX_UPDATES_ON_WIRE,
    SUSPECT,
    DetectorConfig,
    FailureDetector,
    Liveness,
    PeerDeclaredDead,
    PeerRecovered,
    PeerSuspected,
    Probe,
    ProbeAck,
    ProbeNack,
    ProbeRequest,
    Rumors,
    SuspicionRefuted,
    Update,
    suspicion_timeout_s,
)
from p2pdeploy.sim.host import NodeDown
from p2pdeploy.sim.network import NetworkConfig
from p2pdeploy.sim.scenario import load_scenario, parse_scenario, run_scenario
from p2pdeploy.sim.simulation import Simulation

CONFIG = DetectorConfig()
ROOT = Path(__file__).resolve().parents[2]


def node_id(index: int) -> int:
    return (index + 1) * 0x1111_1111_1111


class Link:
    """Detectors at addresses 0..n-1 with instant delivery through the codec; time jumps to deadlines."""

    def __init__(self, n: int, config: DetectorConfig = CONFIG, seed: int = 0) -> None:
        self.detectors = [
            FailureDetector(node_id(i), random.Random(seed * 100 + i), config) for i in range(n)
        ]
        self.now = 0.0
        self.down: set[int] = set()
        #: ``drop(src, dst, msg) -> bool``: messages it returns true for are lost.
        self.drop = lambda src, dst, msg: False
        self.events: list[tuple[int, object]] = []
        self.sent: list[tuple[int, int, object]] = []
        self.sent_at: list[float] = []

    def watch(self, a: int, b: int) -> None:
        self.detectors[a].watch(node_id(b), b, self.now)

    def flush(self, index: int) -> list[tuple[int, object]]:
        det = self.detectors[index]
        while (event := det.next_event()) is not None:
            self.events.append((index, event))
        out = []
        for dst, msg in det.messages_to_send():
            data = wire.encode(msg, limit_bytes=wire.DATAGRAM_LIMIT_BYTES)
            out.append((dst, wire.decode(data)))
        return out

    def run(self, until: float) -> None:
        queue: list[tuple[int, int, object]] = []
        for index in range(len(self.detectors)):
            queue += [(index, dst, msg) for dst, msg in self.flush(index)]
        while True:
            while queue:
                src, dst, msg = queue.pop(0)
                self.sent.append((src, dst, msg))
                self.sent_at.append(self.now)
                if dst in self.down or src in self.down or self.drop(src, dst, msg):
                    continue
                self.detectors[dst].receive(src, msg, self.now)
                queue += [(dst, d, m) for d, m in self.flush(dst)]
            due = [
                (deadline, i)
                for i, det in enumerate(self.detectors)
                if i not in self.down and (deadline := det.next_deadline()) is not None
            ]
            if not due or min(due)[0] > until:
                self.now = until
                return
            deadline, index = min(due)
            self.now = max(self.now, deadline)
            self.detectors[index].handle_timer(self.now)
            queue += [(index, dst, msg) for dst, msg in self.flush(index)]

    def of(self, index: int, cls: type) -> list:
        return [e for i, e in self.events if i == index and isinstance(e, cls)]


def everyone_watches_everyone(n: int, **kwargs) -> Link:
    link = Link(n, **kwargs)
    for a in range(n):
        for b in range(n):
            if a != b:
                link.watch(a, b)
    return link


# -- probing -----------------------------------------------------------------------------------


def test_peers_that_answer_stay_alive_and_keep_a_healthy_score():
    link = everyone_watches_everyone(4)
    link.run(60.0)
    for det in link.detectors:
        assert all(det.state(node_id(i)) is Liveness.alive for i in range(4) if node_id(i) != det.node_id)
        assert det.health == 0
        assert det.stats.probes >= 100  # one every 0.5 s
        assert det.stats.probes_failed == 0
    assert not [e for _, e in link.events if isinstance(e, (PeerSuspected, PeerDeclaredDead))]


def test_each_watched_peer_is_probed_once_per_pass_of_the_shuffled_round_robin():
    link = Link(6)
    for b in range(1, 6):
        link.watch(0, b)
    link.run(20.0)
    probes = [dst for src, dst, msg in link.sent if src == 0 and type(msg) is Probe]
    for start in range(0, len(probes) - 5, 5):
        assert sorted(probes[start : start + 5]) == [1, 2, 3, 4, 5]


def test_a_silent_peer_is_suspected_at_the_end_of_its_period_and_dead_after_the_longest_suspicion():
    link = Link(2)
    link.watch(0, 1)
    link.down.add(1)
    link.run(30.0)
    det = link.detectors[0]
    probe_sent = next(i for i, (src, _, msg) in enumerate(link.sent) if src == 0 and type(msg) is Probe)
    assert [type(e) for e in link.of(0, (PeerSuspected, PeerDeclaredDead))] == [
        PeerSuspected,
        PeerDeclaredDead,
    ]
    assert probe_sent == 0
    assert det.state(node_id(1)) is Liveness.dead
    assert det.dead(node_id(1)) and not det.alive(node_id(1)) and not det.suspect(node_id(1))


def test_suspicion_and_verdict_times_follow_the_period_and_the_longest_suspicion():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    now = det.next_deadline()
    det.handle_timer(now)  # the first period starts: a probe to 1
    assert [type(m) for _, m in det.messages_to_send()] == [Probe]
    started = now
    suspected_at = None
    while (deadline := det.next_deadline()) is not None and deadline < 60:
        det.handle_timer(deadline)
        det.messages_to_send()
        if suspected_at is None and det.suspect(node_id(1)):
            suspected_at = deadline
        if det.dead(node_id(1)):
            break
    assert suspected_at == pytest.approx(started + CONFIG.protocol_period_s)
    assert deadline == pytest.approx(suspected_at + CONFIG.suspicion_max_s)


def test_an_indirect_probe_keeps_alive_a_peer_whose_direct_path_is_broken():
    link = everyone_watches_everyone(4)
    link.drop = lambda src, dst, msg: {src, dst} == {0, 1}
    link.run(60.0)
    det = link.detectors[0]
    assert det.state(node_id(1)) is Liveness.alive
    assert det.stats.indirect_requests > 0
    assert not link.of(0, PeerDeclaredDead)
    assert any(type(msg) is ProbeRequest for src, _, msg in link.sent if src == 0)


def test_relays_nack_a_silent_target_so_the_asker_does_not_blame_itself():
    link = everyone_watches_everyone(5)
    link.down.add(1)
    link.run(5.0)
    det = link.detectors[0]
    assert det.stats.nacks_received > 0
    assert det.health == 0  # every expected nack came: the target is slow, not this node


def test_missing_nacks_raise_local_health_and_stretch_the_probe_period():
    link = Link(5)
    for b in range(1, 5):
        link.watch(0, b)
    link.down.update({1, 2, 3, 4})  # relays silent too: from here it looks like this node's fault
    link.run(8.0)  # before any suspicion expires
    det = link.detectors[0]
    assert det.health >= 3
    # Probes that went on to ping-reqs: the round robin's, not the per-period checks of suspects.
    seqs = {msg.seq for src, _, msg in link.sent if src == 0 and type(msg) is ProbeRequest}
    times = [
        at
        for at, (src, _, msg) in zip(link.sent_at, link.sent, strict=True)
        if src == 0 and type(msg) is Probe and msg.seq in seqs
    ]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert gaps == sorted(gaps)
    assert gaps[0] == pytest.approx(CONFIG.protocol_period_s)
    assert gaps[-1] >= 3 * CONFIG.protocol_period_s


def test_a_successful_probe_lowers_the_health_score():
    link = everyone_watches_everyone(3)
    det = link.detectors[0]
    det.health = 5
    link.run(20.0)
    assert det.health == 0


# -- suspicion ---------------------------------------------------------------------------------


def suspect_of(det: FailureDetector, peer: int, incarnation: int, origin: int) -> Rumors:
    return Rumors(origin, 0, (Update(node_id(peer), incarnation, SUSPECT, origin),))


def test_confirmations_from_other_watchers_shorten_the_suspicion_to_the_minimum():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    for other in (2, 3, 4, 5):
        det.watch(node_id(other), other, 0.0)
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 1.0)
    assert det.suspect(node_id(1))
    assert det.timer_deadline(("suspicion", node_id(1))) == pytest.approx(1.0 + CONFIG.suspicion_max_s)
    deadlines = []
    for origin in (3, 4, 5):
        det.receive(origin, suspect_of(det, 1, 0, node_id(origin)), 1.5)
        deadlines.append(det.timer_deadline(("suspicion", node_id(1))))
    assert deadlines == sorted(deadlines, reverse=True)
    assert deadlines[-1] == pytest.approx(1.0 + CONFIG.suspicion_min_s)
    det.receive(3, suspect_of(det, 1, 0, node_id(3)), 1.6)  # the same origin again counts once
    assert det.timer_deadline(("suspicion", node_id(1))) == pytest.approx(1.0 + CONFIG.suspicion_min_s)
    det.handle_timer(1.0 + CONFIG.suspicion_min_s)
    assert det.dead(node_id(1))


def test_a_confirmation_past_the_shortened_deadline_convicts_at_once():
    det = FailureDetector(node_id(0), random.Random(1))
    for peer in (1, 2, 3, 4, 5):
        det.watch(node_id(peer), peer, 0.0)
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 0.0)
    later = CONFIG.suspicion_min_s + 1.0
    for origin in (3, 4, 5):
        det.receive(origin, suspect_of(det, 1, 0, node_id(origin)), later)
    assert det.next_deadline() <= later
    det.handle_timer(later)
    assert det.dead(node_id(1))


@given(st.integers(min_value=0, max_value=20), st.integers(min_value=0, max_value=6))
def test_the_suspicion_timeout_shrinks_from_max_to_min_with_confirmations(n, k):
    config = DetectorConfig(confirmations=k)
    timeout = suspicion_timeout_s(n, config)
    assert config.suspicion_min_s <= timeout <= config.suspicion_max_s
    assert suspicion_timeout_s(n + 1, config) <= timeout
    if k == 0 or n >= k:
        assert timeout == pytest.approx(config.suspicion_min_s)
    if n == 0 and k > 0:
        assert timeout == pytest.approx(config.suspicion_max_s)


def test_the_suspecting_node_tells_the_suspect_which_refutes_and_recovers():
    link = everyone_watches_everyone(3)
    link.drop = lambda src, dst, msg: type(msg) in (ProbeAck, ProbeNack) and dst == 0 and link.now < 3.0
    link.run(3.0)
    link.drop = lambda src, dst, msg: False
    det = link.detectors[0]
    suspected = {e.node_id for e in link.of(0, PeerSuspected)}
    assert suspected
    link.run(6.0)
    for peer in suspected:
        assert det.alive(peer)
    assert {e.node_id for e in link.of(0, PeerRecovered)} == suspected
    refuters = [i for i in (1, 2) if link.of(i, SuspicionRefuted)]
    assert refuters
    for i in refuters:
        assert det.incarnation_of(node_id(i)) == link.detectors[i].incarnation >= 1
    assert not link.of(0, PeerDeclaredDead)


def test_a_dead_verdict_is_accepted_from_gossip_and_the_live_node_it_names_refutes_it():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    det.watch(node_id(2), 2, 0.0)
    det.receive(2, Rumors(node_id(2), 0, (Update(node_id(1), 0, DEAD, node_id(2)),)), 1.0)
    assert det.dead(node_id(1))
    assert [type(e) for e in iter(det.next_event, None)] == [PeerDeclaredDead]
    det.messages_to_send()

    accused = FailureDetector(node_id(1), random.Random(2))
    accused.receive(2, Rumors(node_id(2), 0, (Update(node_id(1), 0, DEAD, node_id(2)),)), 1.0)
    assert accused.incarnation == 1
    (dst, refutation), *_ = accused.messages_to_send()
    assert dst == 2 and refutation.updates[0] == Update(node_id(1), 1, ALIVE, node_id(1))

    det.receive(2, Rumors(node_id(2), 0, refutation.updates), 2.0)
    assert det.alive(node_id(1))
    assert det.incarnation_of(node_id(1)) == 1
    assert [type(e) for e in iter(det.next_event, None)] == [PeerRecovered]


def test_a_peer_held_dead_is_still_probed_with_the_verdict_and_comes_back_when_it_refutes():
    link = Link(2)
    link.watch(0, 1)
    link.down.add(1)
    link.run(20.0)
    assert link.detectors[0].dead(node_id(1))
    link.down.clear()  # a wrongly convicted (or restarted) node answers again
    link.run(40.0)
    assert link.detectors[0].alive(node_id(1))
    assert link.detectors[1].incarnation >= 1
    assert link.of(0, PeerRecovered)


def test_heard_clears_a_suspicion_this_node_raised_but_not_one_adopted_from_gossip():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    det.watch(node_id(2), 2, 0.0)
    # Adopted from node 2's gossip: hearing from 1 is not enough, 1 is told so it refutes.
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 1.0)
    det.messages_to_send()
    det.heard(node_id(1), 1, 2.0)
    assert det.suspect(node_id(1))
    assert [(dst, type(m)) for dst, m in det.messages_to_send()] == [(1, Rumors)]
    # Raised here, from its own failed probe: hearing from the peer clears it.
    link = Link(2)
    link.watch(0, 1)
    link.down.add(1)
    link.run(2.0)
    own = link.detectors[0]
    assert own.suspect(node_id(1))
    own.heard(node_id(1), 1, link.now)
    assert own.alive(node_id(1))
    assert PeerRecovered(node_id(1), 0) in list(iter(own.next_event, None))


@given(
    st.lists(
        st.tuples(
            st.sampled_from([ALIVE, SUSPECT, DEAD]), st.integers(min_value=0, max_value=6), st.integers(2, 6)
        ),
        max_size=40,
    )
)
def test_incarnation_order_decides_between_rumors(rumors):
    """Incarnations never go back; a higher incarnation's alive overrides any suspicion or verdict;
    a lower incarnation's suspicion or verdict changes nothing; only a higher alive leaves dead."""
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    for origin in range(2, 7):
        det.watch(node_id(origin), origin, 0.0)
    now = 0.0
    for status, incarnation, origin in rumors:
        now += 0.01
        before_state, before_inc = det.state(node_id(1)), det.incarnation_of(node_id(1))
        det.receive(
            origin,
            Rumors(node_id(origin), 0, (Update(node_id(1), incarnation, status, node_id(origin)),)),
            now,
        )
        after_state, after_inc = det.state(node_id(1)), det.incarnation_of(node_id(1))
        assert after_inc >= before_inc
        if status == ALIVE and incarnation > before_inc:
            assert after_state is Liveness.alive and after_inc == incarnation
        if status != ALIVE and incarnation < before_inc:
            assert (after_state, after_inc) == (before_state, before_inc)
        if before_state is Liveness.dead and after_state is not Liveness.dead:
            assert status == ALIVE and incarnation > before_inc
        if status == SUSPECT and incarnation >= before_inc and before_state is not Liveness.dead:
            assert after_state is Liveness.suspect
    assert det.state(node_id(1)) is not Liveness.unknown


@given(st.integers(min_value=0, max_value=1000), st.sampled_from([SUSPECT, DEAD]), st.integers(0, 50))
def test_a_node_refutes_any_suspicion_of_itself_at_or_above_its_incarnation(incarnation, status, own):
    det = FailureDetector(node_id(0), random.Random(1))
    det.incarnation = own
    det.receive(3, Rumors(node_id(3), 0, (Update(node_id(0), incarnation, status, node_id(3)),)), 1.0)
    if incarnation >= own:
        assert det.incarnation == incarnation + 1
        assert [type(e) for e in iter(det.next_event, None)] == [SuspicionRefuted]
    else:
        assert det.incarnation == own
        assert det.next_event() is None


# -- membership is the caller's ----------------------------------------------------------------


def test_rumors_about_unwatched_peers_are_ignored_and_unwatch_forgets_everything():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    det.receive(1, Rumors(node_id(1), 0, (Update(node_id(9), 0, DEAD, node_id(1)),)), 0.5)
    assert det.state(node_id(9)) is Liveness.unknown
    assert det.next_event() is None
    det.receive(1, suspect_of(det, 1, 0, node_id(7)), 0.6)
    det.unwatch(node_id(1))
    assert det.state(node_id(1)) is Liveness.unknown
    assert det.watched() == []
    assert det.gossip_pending() == 0
    assert det.timer_deadline(("suspicion", node_id(1))) is None


def test_watch_is_idempotent_updates_the_address_and_refuses_self_and_overflow():
    det = FailureDetector(node_id(0), random.Random(1), DetectorConfig(max_watched=2))
    det.watch(node_id(1), 1, 0.0)
    det.watch(node_id(1), 11, 0.0)
    det.watch(node_id(2), 2, 0.0)
    assert det.watched() == [node_id(1), node_id(2)]
    with pytest.raises(RuntimeError, match="max_watched"):
        det.watch(node_id(3), 3, 0.0)
    with pytest.raises(ValueError, match="itself"):
        det.watch(node_id(0), 0, 0.0)
    det.handle_timer(det.next_deadline())
    det.handle_timer(det.next_deadline())
    assert {dst for dst, m in det.messages_to_send() if type(m) is Probe} <= {11, 2}


def test_a_peer_two_layers_watch_is_still_probed_and_declared_dead_after_one_lets_go():
    link = Link(2)
    det = link.detectors[0]
    det.watch(node_id(1), 1, 0.0, by="overlay")
    det.watch(node_id(1), 1, 0.0, by="deployment")
    assert det.holders(node_id(1)) == {"overlay", "deployment"}
    det.unwatch(node_id(1), by="overlay")
    assert det.watched() == [node_id(1)]
    assert det.watched(by="overlay") == []
    assert det.watched(by="deployment") == [node_id(1)]
    link.down.add(1)
    link.run(30.0)
    assert any(src == 0 and dst == 1 and type(msg) is Probe for src, dst, msg in link.sent)
    assert [e.node_id for e in link.of(0, PeerDeclaredDead)] == [node_id(1)]
    assert det.dead(node_id(1))


def test_a_peer_is_forgotten_only_when_its_last_holder_lets_go():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0, by="overlay")
    det.watch(node_id(1), 1, 0.0, by="deployment")
    det.watch(node_id(2), 2, 0.0, by="deployment")
    det.receive(1, suspect_of(det, 1, 0, node_id(7)), 0.5)
    det.unwatch(node_id(1), by="nobody")  # a holder it never had: nothing changes
    det.unwatch(node_id(1), by="deployment")
    assert det.suspect(node_id(1))
    det.unwatch(node_id(1), by="deployment")  # twice is harmless
    assert det.holders(node_id(1)) == {"overlay"}
    det.unwatch(node_id(1), by="overlay")
    assert det.state(node_id(1)) is Liveness.unknown
    assert det.holders(node_id(1)) == frozenset()
    assert det.watched() == [node_id(2)]
    assert det.gossip_pending() == 0
    assert det.timer_deadline(("suspicion", node_id(1))) is None


def test_max_watched_counts_peers_not_holders():
    det = FailureDetector(node_id(0), random.Random(1), DetectorConfig(max_watched=2))
    det.watch(node_id(1), 1, 0.0, by="overlay")
    det.watch(node_id(2), 2, 0.0, by="overlay")
    det.watch(node_id(1), 1, 0.0, by="deployment")  # a second holder of a watched peer fits
    assert det.watch_count() == 2
    with pytest.raises(RuntimeError, match="max_watched"):
        det.watch(node_id(3), 3, 0.0, by="deployment")
    det.unwatch(node_id(2), by="overlay")
    det.watch(node_id(3), 3, 0.0, by="deployment")
    assert det.watched(by="deployment") == [node_id(1), node_id(3)]


# -- bad input and bounds ----------------------------------------------------------------------


def test_bad_input_from_peers_is_dropped_and_counted_never_raised():
    det = FailureDetector(node_id(0), random.Random(1), DetectorConfig(max_relays=1))
    det.watch(node_id(1), 1, 0.0)
    det.receive(1, ProbeAck(12345, node_id(1), 0), 0.1)
    det.receive(1, ProbeNack(12345, node_id(1), 0), 0.1)
    det.receive(5, Probe(1, node_id(5), 0, node_id(4)), 0.1)  # not for this node
    det.receive(5, ProbeRequest(1, node_id(5), 0, node_id(0), 0, 0.1), 0.1)  # probe yourself
    det.receive(5, ProbeRequest(2, node_id(5), 0, node_id(6), 6, 0.1), 0.1)
    det.receive(5, ProbeRequest(3, node_id(5), 0, node_id(7), 7, 0.1), 0.1)  # over max_relays
    det.receive(5, "not a message", 0.1)
    assert det.dropped == {
        "unsolicited_ack": 1,
        "unsolicited_nack": 1,
        "misaddressed": 1,
        "bad_request": 1,
        "relay_overload": 1,
        "unexpected": 1,
    }
    assert det.alive(node_id(1))


@pytest.mark.parametrize(
    "fields",
    [
        [1, b"\x00" * 20, 0, b"\x01" * 20, [[b"\x02" * 20, 0, 7, b"\x03" * 20]]],  # unknown status
        [1, b"\x00" * 20, -1, b"\x01" * 20, []],  # negative incarnation
        [1, b"\x00" * 20, 0, b"\x01" * 20, [[b"\x02" * 20, 0, 1, b"\x03" * 20]] * (MAX_UPDATES_ON_WIRE + 1)],
        [1, b"\x00" * 19, 0, b"\x01" * 20, []],  # short id
    ],
)
def test_malformed_probes_are_decode_errors(fields):
    import cbor2

    result = wire.decode(cbor2.dumps([wire.VERSION, wire.tag_of(Probe), fields]))
    assert isinstance(result, wire.DecodeError) and result.kind == "malformed"


def test_the_largest_possible_message_fits_a_datagram():
    top = (1 << 160) - 1
    updates = tuple(Update(top, (1 << 64) - 1, DEAD, top) for _ in range(MAX_UPDATES_ON_WIRE))
    biggest = ProbeRequest((1 << 64) - 1, top, (1 << 64) - 1, top, ("f" * 45, 65535), 59.123456789, updates)
    assert len(wire.encode(biggest)) < 1100
    for msg in (
        Probe((1 << 64) - 1, top, (1 << 64) - 1, top, updates),
        ProbeAck((1 << 64) - 1, top, (1 << 64) - 1, updates),
        ProbeNack((1 << 64) - 1, top, (1 << 64) - 1, updates),
        Rumors(top, (1 << 64) - 1, updates),
    ):
        assert len(wire.encode(msg)) < 1100


def test_a_full_gossip_buffer_stays_capped_and_every_message_stays_small():
    config = DetectorConfig(max_gossip=32)
    det = FailureDetector(node_id(0), random.Random(1), config)
    for peer in range(1, 200):
        det.watch(node_id(peer), peer, 0.0)
    for peer in range(1, 200):
        det.receive(peer, suspect_of(det, peer % 198 + 1, 0, node_id(peer)), 0.1)
    assert det.gossip_pending() <= config.max_gossip
    now = 0.1
    for _ in range(20):
        now = det.next_deadline()
        det.handle_timer(now)
        for _, msg in det.messages_to_send():
            assert len(msg.updates) <= config.max_updates_per_message
            assert len(wire.encode(msg, limit_bytes=wire.DATAGRAM_LIMIT_BYTES)) < 700


def test_each_rumor_is_piggybacked_a_bounded_number_of_times():
    link = everyone_watches_everyone(4)
    link.detectors[0].receive(1, suspect_of(link.detectors[0], 3, 0, node_id(1)), 0.0)
    link.down.add(3)
    link.run(0.01)
    link.run(2.0)
    carried = sum(
        1
        for src, _, msg in link.sent
        if src == 0
        for u in msg.updates
        if u == Update(node_id(3), 0, SUSPECT, node_id(1))
    )
    assert 1 <= carried <= CONFIG.gossip_transmissions


def test_config_rejects_a_probe_timeout_as_long_as_the_period():
    with pytest.raises(ValueError, match="probe_timeout_s"):
        DetectorConfig(protocol_period_s=0.5, probe_timeout_s=0.5)
    with pytest.raises(ValueError, match="max_updates_per_message"):
        DetectorConfig(max_updates_per_message=MAX_UPDATES_ON_WIRE + 1)


# -- the simulator: pause and resume -----------------------------------------------------------


def test_a_paused_node_drops_what_arrives_runs_no_timer_and_resumes_its_core():
    sim = Simulation(2, network=NetworkConfig(latency_model="constant", base_latency_ms=5.0))
    a = FailureDetector(node_id(0), random.Random(1))
    b = FailureDetector(node_id(1), random.Random(2))
    sim.hosts[0].start(a)
    sim.hosts[1].start(b)
    sim.hosts[0].call(lambda core, now: core.watch(node_id(1), 1, now))
    sim.hosts[1].call(lambda core, now: core.watch(node_id(0), 0, now))
    sim.run(5.0)
    probes_before = b.stats.probes
    sim.hosts[1].pause()
    assert not sim.hosts[1].up
    with pytest.raises(NodeDown):
        sim.hosts[1].call(lambda core, now: None)
    sim.run(7.0)
    assert b.stats.probes == probes_before  # no timer fired
    assert sim.network.dropped["down"] > 0  # a's probes to it were dropped
    assert a.suspect(node_id(1))
    sim.hosts[1].resume()
    assert sim.hosts[1].core is b
    with pytest.raises(RuntimeError, match="not paused"):
        sim.hosts[1].resume()
    sim.run(12.0)
    assert b.stats.probes > probes_before
    assert a.alive(node_id(1))
    assert b.incarnation == 1  # it refuted the suspicion it found on resuming


# -- the simulator: acceptance ------------------------------------------------------------------


def run_detector(seed=1, **settings):
    scenario = {"protocol": "detector", "seed": seed, "metrics": {"per_node": False}}
    for key, value in settings.items():
        section, _, name = key.partition("__")
        if name:
            scenario.setdefault(section, {})[name] = value
        else:
            scenario[key] = value
    return run_scenario(parse_scenario(scenario))


LAN = {
    "network__latency_model": "euclidean",
    "network__base_latency_ms": 1.0,
    "network__latency_scale_ms": 10.0,
    "network__jitter_ms": 1.0,
}


def test_killed_nodes_are_declared_dead_by_every_live_watcher_median_within_5_s():
    result = run_detector(
        nodes=50,
        duration_s=90.0,
        detector__kills=10,
        detector__kill_interval_s=5.0,
        detector__pauses=0,
        **LAN,
    )
    summary, runner = result.summary, result.runner
    assert summary["kills"] == 10
    assert summary["undetected"] == 0
    assert summary["detections"] >= 10 * 10
    assert summary["detection_median_s"] < 5.0
    assert summary["false_deaths"] == 0
    for victim in runner.killed_at:
        for watcher in runner.watchers[victim]:
            det = runner.detectors[watcher]
            if det is not None:
                assert det.dead(runner.node_ids[victim])


def test_a_node_paused_for_2_s_is_never_declared_dead():
    result = run_detector(
        nodes=50,
        duration_s=100.0,
        detector__kills=0,
        detector__pauses=30,
        detector__pause_s=2.0,
        detector__pause_start_s=5.0,
        detector__pause_interval_s=3.0,
        **LAN,
    )
    summary, runner = result.summary, result.runner
    assert summary["pauses"] == 30
    assert summary["false_suspicions"] > 0  # the pauses were noticed...
    assert summary["false_deaths"] == 0  # ...and refuted in time
    for address, det in enumerate(runner.detectors):
        assert all(det.alive(runner.node_ids[other]) for other in runner.watches[address])


def test_under_10_percent_loss_no_live_node_is_declared_dead():
    summary = run_detector(nodes=50, duration_s=120.0, detector__kills=0, network__loss=0.1, **LAN).summary
    assert summary["messages_dropped_loss"] > 0
    assert summary["false_suspicions"] > 0
    assert summary["false_deaths"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_minutes_of_10_percent_loss_with_kills_and_pauses_convict_only_the_killed(seed):
    summary = run_detector(
        seed=seed,
        nodes=50,
        duration_s=600.0,
        detector__kills=10,
        detector__kill_interval_s=50.0,
        detector__pauses=100,
        detector__pause_interval_s=5.0,
        network__loss=0.1,
        **LAN,
    ).summary
    assert summary["false_deaths"] == 0
    assert summary["undetected"] == 0
    assert summary["detection_median_s"] < 5.0


def test_the_scenario_file_runs_and_reports_its_figures_deterministically():
    path = ROOT / "simulations" / "detector.toml"
    first = run_scenario(
        load_scenario(path, overrides=["duration_s=40", "detector.kills=2", "detector.pauses=2"])
    )
    second = run_scenario(
        load_scenario(path, overrides=["duration_s=40", "detector.kills=2", "detector.pauses=2"])
    )
    assert first.summary["trace_hash"] == second.summary["trace_hash"]
    for key in ("detection_median_s", "detection_p99_s", "false_deaths", "messages_per_node_per_s"):
        assert key in first.summary
    assert first.summary["detections"] > 0
    assert not math.isnan(first.summary["messages_per_node_per_s"])


# -- local health: a node that did not run does not accuse -------------------------------------


def test_a_probe_period_that_ends_late_accuses_no_one_and_the_node_slows_down():
    det = FailureDetector(node_id(0), random.Random(1))
    det.watch(node_id(1), 1, 0.0)
    det.handle_timer(det.next_deadline())  # a probe to 1 goes out
    det.messages_to_send()
    period_end = det.next_deadline()
    det.handle_timer(period_end + 2.0)  # this node was stopped for 2 s: the ack may be waiting
    assert det.alive(node_id(1))
    assert det.health == 1
    assert det.next_event() is None


def test_a_suspicion_that_expires_while_the_node_was_stopped_gives_the_peer_another_period():
    det = FailureDetector(node_id(0), random.Random(1))
    for peer in (1, 2):
        det.watch(node_id(peer), peer, 0.0)
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 0.0)
    expiry = det.timer_deadline(("suspicion", node_id(1)))
    det.handle_timer(expiry + 2.0)
    assert det.suspect(node_id(1))
    det.receive(1, Rumors(node_id(1), 1, ()), expiry + 2.2)  # its refutation arrives in time
    assert det.alive(node_id(1))


def test_a_suspicion_timer_on_time_convicts():
    det = FailureDetector(node_id(0), random.Random(1))
    for peer in (1, 2):
        det.watch(node_id(peer), peer, 0.0)
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 0.0)
    det.handle_timer(det.timer_deadline(("suspicion", node_id(1))))
    assert det.dead(node_id(1))


# -- the other watchers hear confirmations and verdicts directly --------------------------------


def test_confirmations_and_verdicts_go_straight_to_the_watchers_that_spread_the_suspicion():
    link = Link(4)
    for peer in (1, 2, 3):
        link.watch(0, peer)
    link.down.add(1)
    det = link.detectors[0]
    # Watchers 2 and 3 tell node 0 they suspect 1; 0's own failed probe then confirms it.
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 0.0)
    det.receive(3, suspect_of(det, 1, 0, node_id(3)), 0.0)
    link.run(CONFIG.suspicion_max_s + 1.0)
    mine = Update(node_id(1), 0, SUSPECT, node_id(0))
    told = {dst for src, dst, msg in link.sent if src == 0 and type(msg) is Rumors and mine in msg.updates}
    assert told == {2, 3}
    assert det.dead(node_id(1))
    verdict_to = {
        dst
        for src, dst, msg in link.sent
        if src == 0 and type(msg) is Rumors and any(u.status == DEAD for u in msg.updates)
    }
    assert verdict_to == {2, 3}


def test_a_watcher_still_suspecting_a_peer_held_dead_is_handed_the_verdict():
    det = FailureDetector(node_id(0), random.Random(1))
    for peer in (1, 2):
        det.watch(node_id(peer), peer, 0.0)
    det.receive(2, Rumors(node_id(2), 0, (Update(node_id(1), 0, DEAD, node_id(2)),)), 0.0)
    det.messages_to_send()
    det.receive(2, suspect_of(det, 1, 0, node_id(2)), 1.0)
    assert [(dst, msg.updates[0].status) for dst, msg in det.messages_to_send()] == [(2, DEAD)]
