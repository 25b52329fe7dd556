"""The standard events: flat attributes subscribers can filter on, and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.collective.events import (
    EVENT_TYPES,
    NodeJoined,
    NodeLeft,
    ReplicaChanged,
    ReplicaState,
    ServiceChanged,
    ServiceCreated,
    ServiceRemoved,
    from_attributes,
)
from p2pdeploy.collective.filters import Filter
from p2pdeploy.fabric.supervisor import ReplicaStateChanged

node_ids = st.integers(min_value=0, max_value=(1 << 160) - 1)
names = st.text(min_size=1, max_size=20)
states = st.sampled_from(list(ReplicaState))


@given(names, names, node_ids, states, st.one_of(st.none(), states), st.text(max_size=30),
       st.integers(min_value=0, max_value=1000))
def test_a_replica_change_survives_its_attributes(service, replica, node, state, previous, reason, run):
    event = ReplicaChanged(service, replica, node, state, previous, reason, run)
    attributes = event.attributes()
    assert attributes["kind"] == "replica_changed" and attributes["state"] == state.value
    assert from_attributes(attributes) == event


@pytest.mark.parametrize("event", [
    NodeJoined(5, "10.0.0.1:7400", {"memory_free": 3 * 1024**3, "tags": ["gpu", "ssd"], "os": "linux"}),
    NodeLeft(5, "failed"),
    ServiceCreated("wiki", 1, 3),
    ServiceChanged("wiki", 2, 5, "scaled"),
    ServiceRemoved("wiki"),
])
def test_every_standard_event_survives_its_attributes(event):
    attributes = event.attributes()
    assert attributes["kind"] == event.kind and event.kind in EVENT_TYPES
    assert from_attributes(attributes) == event


def test_the_issue_filters_pick_the_standard_events_they_name():
    events = [
        ReplicaChanged("wiki", "wiki-1", 1, ReplicaState.FAILED, ReplicaState.RUNNING, "memory limit", 2),
        ReplicaChanged("wiki", "wiki-2", 2, ReplicaState.RUNNING, ReplicaState.STARTING),
        ReplicaChanged("db", "db-1", 3, ReplicaState.STOPPED, ReplicaState.STOPPING),
        NodeJoined(4, "10.0.0.4:7400", {"memory_free": 4 * 1024**3}),
        NodeJoined(5, "10.0.0.5:7400", {"memory_free": 1024**3}),
    ]
    wiki_down = Filter.parse('service == "wiki" and state in {"failed", "stopped"}')
    roomy = Filter.parse('kind == "node_joined" and memory_free >= 2G')
    assert [e for e in events if wiki_down.matches(e.attributes())] == events[:1]
    assert [e for e in events if roomy.matches(e.attributes())] == events[3:4]


def test_a_supervisor_event_becomes_a_replica_change():
    local = ReplicaStateChanged("wiki-1", ReplicaState.STARTING, ReplicaState.RUNNING, "", 1)
    event = ReplicaChanged.from_supervisor(local, "wiki", 9)
    assert (event.state, event.previous, event.node_id, event.service) == (ReplicaState.RUNNING,
                                                                             ReplicaState.STARTING, 9, "wiki")


def test_garbled_standard_events_are_errors_and_other_kinds_are_none():
    assert from_attributes({"kind": "custom", "x": 1}) is None
    assert from_attributes({}) is None
    with pytest.raises(ValueError, match="a replica_changed event needs the attribute service"):
        from_attributes({"kind": "replica_changed", "state": "running"})
    with pytest.raises(ValueError, match="node must be 40 hex digits"):
        from_attributes({"kind": "node_left", "node": "12"})
    with pytest.raises(ValueError, match="node attributes may not be named kind"):
        NodeJoined(1, "a:1", {"kind": "x"}).attributes()
    with pytest.raises(TypeError, match="state must be a ReplicaState"):
        ReplicaChanged("wiki", "wiki-1", 1, "running")


@pytest.mark.parametrize(("attributes", "message"), [
    ({"kind": "service_created", "service": "wiki", "version": None, "replicas": 3}, "version must be a whole number"),
    ({"kind": "service_created", "service": "wiki", "version": "2", "replicas": 3}, "version must be a whole number"),
    ({"kind": "service_removed", "service": ["wiki"]}, "service must be a string"),
    ({"kind": "replica_changed", "service": "wiki", "replica": "wiki-1", "node": "0" * 40, "state": "asleep"},
     "state 'asleep' is not a valid ReplicaState"),
    ({"kind": "node_joined", "node": "0" * 40}, "needs the attributes node and address"),
])
def test_a_published_event_of_the_wrong_types_is_a_value_error(attributes, message):
    """Attributes come from any publisher: a wrong type is refused as garbled (ValueError, which
    subscribers handle), never another exception and never coerced (``"2"`` is not version 2)."""
    with pytest.raises(ValueError, match=message):
        from_attributes(attributes)
