"""Suspicions: one list per node of the contacts its layers avoid, backed by the failure detector."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.collective.prospector import Prospector
from p2pdeploy.overlay.broadcast import Broadcast
from p2pdeploy.overlay.multicast import Multicast
from p2pdeploy.overlay.suspicion import Suspicions
from tests.simnet import SimNet


class _Verdicts:
    """The part of a failure detector the suspicions ask: which nodes it declared dead."""

    def __init__(self, dead: set[int]) -> None:
        self._dead = dead

    def dead(self, node_id: int) -> bool:
        return node_id in self._dead


def test_a_suspicion_holds_until_its_time_and_hearing_from_the_node_clears_it():
    suspicions = Suspicions()
    suspicions.suspect(7, until=10.0, now=0.0)
    assert suspicions.suspected(7, 9.9)
    assert not suspicions.suspected(7, 10.0)
    assert len(suspicions) == 0  # forgotten once it ran out
    suspicions.suspect(7, until=10.0, now=0.0)
    suspicions.clear(7)
    assert not suspicions.suspected(7, 1.0)


def test_a_longer_suspicion_held_is_kept():
    suspicions = Suspicions()
    suspicions.suspect(7, until=120.0, now=0.0)  # one layer: 120 s
    suspicions.suspect(7, until=70.0, now=10.0)  # another, later: 60 s
    assert suspicions.suspected(7, 100.0)
    assert suspicions.until(7) == 120.0


def test_the_detectors_dead_are_suspected_whatever_the_layers_saw():
    suspicions = Suspicions(_Verdicts({5}))
    assert suspicions.suspected(5, 0.0)
    suspicions.clear(5)
    assert suspicions.suspected(5, 0.0)
    assert not suspicions.suspected(6, 0.0)
    assert list(suspicions.active(0.0)) == []  # only the layers' own suspicions are listed


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 100), st.floats(0, 100)), max_size=200))
def test_the_list_never_grows_past_its_bound(entries):
    suspicions = Suspicions(max_entries=8)
    for node_id, until, now in entries:
        suspicions.suspect(node_id, until, now)
        assert len(suspicions) <= 8


def test_a_bound_below_one_is_refused():
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        Suspicions(max_entries=0)


def test_every_layer_of_a_node_shares_its_overlays_list():
    addresses = iter(range(4))
    net = SimNet(lambda overlay, rng: [Broadcast(overlay, rng), Multicast(overlay, rng, next(addresses)),
                                       Prospector(overlay, overlay.node_id, rng)], seed=1)
    net.fill_tables(4)
    shared = net.overlays[0].suspicions
    assert net.layer(0, Broadcast).suspicions is shared
    assert net.layer(0, Multicast).suspicions is shared
    assert net.layer(0, Prospector).suspicions is shared
    assert net.overlays[1].suspicions is not shared
