"""Publish/subscribe: content filters at the subscriber, per-publisher order, delivery guarantees.

Order keeping is a unit (a fake multicast layer hands events in any order); the rest runs on the
simulator with whole stacks (overlay, multicast, pub/sub; tests/simnet.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.collective.filters import FilterError
from p2pdeploy.collective.pubsub import GROUP_PREFIX, Delivered, PublishedEvent, PubSub, PubSubConfig
from p2pdeploy.overlay.broadcast import SpreadConfig
from p2pdeploy.overlay.multicast import GroupDelivered, Multicast, MulticastConfig
from tests.simnet import SimNet

# -- order keeping, as a unit ---------------------------------------------------------------


class FakeMulticast:
    """Just enough of the multicast layer: it records the groups joined and what is sent."""

    own_id = 1
    spread_config = SpreadConfig()

    def __init__(self) -> None:
        self.joined: set[str] = set()
        self.sent: list[tuple[str, bytes, bool]] = []
        self.left: list[str] = []

    def join(self, name, now):
        self.joined.add(name)

    def leave(self, name, now):
        self.left.append(name)
        self.joined.discard(name)

    def send_to(self, name, payload, now, *, reliable=False):
        self.sent.append((name, payload, reliable))
        return len(self.sent)

    def is_joined(self, name):
        return name in self.joined


@dataclass
class Feed:
    """Hands a subscriber's pub/sub layer events of one publisher, as the group would."""

    pubsub: PubSub
    multicast: FakeMulticast
    publisher: int = 7
    epoch: int = 99

    def event(self, sequence: int, now: float, topic: str = "t", **attributes) -> None:
        payload = wire.encode(PublishedEvent(self.publisher, self.epoch, topic, sequence, attributes or {"n": sequence}))
        assert GROUP_PREFIX + topic in self.multicast.joined
        delivered = GroupDelivered(GROUP_PREFIX + topic, 0, sequence, self.publisher, payload, 1)
        assert self.pubsub.handle_event(delivered, now)

    def delivered(self) -> list[int]:
        out = []
        while (event := self.pubsub.next_event()) is not None:
            out.append(event.sequence)
        return out


def feed(config: PubSubConfig | None = None, filter_expr: str | None = None) -> Feed:
    multicast = FakeMulticast()
    pubsub = PubSub(multicast, random.Random(0), config)
    pubsub.subscribe("t", filter_expr, 0.0)
    return Feed(pubsub, multicast)


@given(st.permutations(list(range(1, 13))), st.lists(st.integers(min_value=1, max_value=12), max_size=6))
def test_events_that_arrive_in_any_order_are_delivered_in_order_once(order, repeats):
    f = feed()
    for sequence in [*order, *repeats]:
        f.event(sequence, 0.0)
    assert f.delivered() == list(range(1, 13))
    assert f.pubsub.counters["duplicates"] == len(repeats)


@given(st.sets(st.integers(min_value=1, max_value=20), min_size=1))
def test_a_gap_that_does_not_fill_in_time_is_skipped(arrived):
    config = PubSubConfig(hold_back_s=2.0)
    f = feed(config)
    for sequence in sorted(arrived, reverse=True):
        f.event(sequence, 0.0)
    now = 0.0
    while (deadline := f.pubsub.next_deadline()) is not None and deadline < 100:
        now = deadline
        f.pubsub.handle_timer(now)
    assert f.delivered() == sorted(arrived)
    assert f.pubsub.counters["skipped"] == max(arrived) - len(arrived)
    assert now <= config.hold_back_s  # all of them waited one hold-back, not one per gap
    f.event(min(arrived), now)  # a straggler from before the gap is a duplicate now
    assert f.delivered() == []


def test_each_publisher_and_topic_is_ordered_on_its_own():
    f = feed()
    f.pubsub.subscribe("u", None, 0.0)
    f.event(2, 0.0)
    f.event(1, 0.0, topic="u")
    other = Feed(f.pubsub, f.multicast, publisher=8)
    other.event(1, 0.0)
    assert f.delivered() == [1, 1]  # u/7#1 and t/8#1; t/7#2 still waits for t/7#1
    f.event(1, 0.0)
    assert f.delivered() == [1, 2]


def test_a_new_epoch_of_a_publisher_starts_a_new_order():
    f = feed()
    f.event(1, 0.0)
    f.event(2, 0.0)
    restarted = Feed(f.pubsub, f.multicast, epoch=100)
    restarted.event(1, 0.0)
    assert f.delivered() == [1, 2, 1]


def test_filters_run_before_delivery_and_each_subscription_gets_its_own_event():
    f = feed(filter_expr='state in {"failed", "stopped"}')
    everything = f.pubsub.subscribe("t", None, 0.0)
    f.event(1, 0.0, state="running")
    f.event(2, 0.0, state="failed")
    events = []
    while (event := f.pubsub.next_event()) is not None:
        events.append((event.subscription_id, event.sequence))
    assert events == [(everything, 1), (1, 2), (everything, 2)]
    assert f.pubsub.counters["filtered_out"] == 1


def test_bad_group_messages_are_dropped_and_counted():
    f = feed()
    handle = f.pubsub.handle_event
    assert handle(GroupDelivered(GROUP_PREFIX + "t", 0, 1, 7, b"\xff\x00junk", 1), 0.0)
    wrong_topic = wire.encode(PublishedEvent(7, 1, "other", 1, {}))
    assert handle(GroupDelivered(GROUP_PREFIX + "t", 0, 2, 7, wrong_topic, 1), 0.0)
    forged = wire.encode(PublishedEvent(8, 1, "t", 1, {}))  # claims another publisher than its sender
    assert handle(GroupDelivered(GROUP_PREFIX + "t", 0, 3, 7, forged, 1), 0.0)
    # another layer's group is not pub/sub's to consume
    assert not handle(GroupDelivered("deployer/x", 0, 4, 7, forged, 1), 0.0)
    assert f.pubsub.dropped["malformed_event"] == 1 and f.pubsub.dropped["misaddressed_event"] == 2
    assert f.pubsub.next_event() is None


def test_local_misuse_names_what_was_wrong():
    f = feed()
    with pytest.raises(FilterError, match="filter: expected a value after '==' at column 9"):
        f.pubsub.subscribe("t", "state ==", 0.0)
    with pytest.raises(ValueError, match="a topic is a non-empty string"):
        f.pubsub.subscribe("", None, 0.0)
    with pytest.raises(TypeError, match="event attribute when must be"):
        f.pubsub.publish("t", {"when": object()}, 0.0)
    with pytest.raises(KeyError, match="no subscription 99"):
        f.pubsub.unsubscribe(99, 0.0)
    with pytest.raises(ValueError, match="pubsub.hold_back_s must be > 0"):
        PubSubConfig(hold_back_s=0)


def test_the_last_unsubscription_of_a_topic_leaves_its_group():
    f = feed()
    second = f.pubsub.subscribe("t", None, 0.0)
    f.pubsub.unsubscribe(1, 0.0)
    assert f.multicast.left == []
    f.pubsub.unsubscribe(second, 0.0)
    assert f.multicast.left == [GROUP_PREFIX + "t"]


# -- on a network ---------------------------------------------------------------------------


def pubsub_net(n: int, *, seed: int = 1, jitter_s: float = 0.0, config: MulticastConfig | None = None) -> SimNet:
    addresses = iter(range(n))

    def layers(overlay, rng):
        multicast = Multicast(overlay, rng, next(addresses), config or MulticastConfig(refresh_interval_s=10.0))
        return [multicast, PubSub(multicast, random.Random(rng.getrandbits(64)))]

    net = SimNet(layers, seed=seed, jitter_s=jitter_s)
    net.fill_tables(n)
    return net


def subscribe(net: SimNet, index: int, topic: str, filter_expr: str | None) -> int:
    return net.call(index, lambda stack, now: stack.layer(PubSub).subscribe(topic, filter_expr, now))


def publish(net: SimNet, index: int, topic: str, attributes: dict, *, reliable: bool = False) -> int:
    return net.call(index, lambda stack, now: stack.layer(PubSub).publish(topic, attributes, now, reliable=reliable))


def got(net: SimNet, index: int, subscription: int) -> list[Delivered]:
    return [e for i, e in net.events if i == index and isinstance(e, Delivered) and e.subscription_id == subscription]


EVENTS = [
    {"service": "wiki", "state": "failed", "replica": "wiki-1"},
    {"service": "wiki", "state": "running", "replica": "wiki-2"},
    {"service": "db", "state": "stopped", "replica": "db-1"},
    {"kind": "node_joined", "memory_free": 3 * 1024**3, "tags": frozenset({"gpu"})},
    {"service": "wiki", "state": "stopped", "replica": "wiki-1", "memory_free": 5 * 1024**3},
    {"kind": "node_joined", "memory_free": 1024**3},
]


def test_subscribers_receive_exactly_the_events_their_filters_match():
    net = pubsub_net(60)
    filters = {3: 'service == "wiki" and state in {"failed", "stopped"}', 17: "memory_free >= 2G", 40: None,
               41: '"gpu" in tags'}
    subs = {i: subscribe(net, i, "replicas", f) for i, f in filters.items()}
    net.run(until=net.now + 2.0)
    assert all(net.layer(i, PubSub).is_active(s) for i, s in subs.items())
    for attributes in EVENTS:
        publish(net, 25, "replicas", attributes)  # a publisher outside the group
    publish(net, 3, "replicas", {"service": "wiki", "state": "failed", "replica": "wiki-9"})  # and one inside
    net.run(until=net.now + 5.0)
    sent = [*EVENTS, {"service": "wiki", "state": "failed", "replica": "wiki-9"}]
    from p2pdeploy.collective.filters import Filter, event_attributes

    for index, source in filters.items():
        expected = [event_attributes(a) for a in sent if Filter.parse(source).matches(event_attributes(a))]
        received = [e.attributes for e in got(net, index, subs[index])]
        assert sorted(map(repr, received)) == sorted(map(repr, expected)), index
    assert not any(isinstance(e, Delivered) for i, e in net.events if i not in filters)


def test_events_of_a_publisher_arrive_in_order_even_when_the_network_reorders_them():
    net = pubsub_net(50, jitter_s=0.2, seed=3)
    subscribers = [4, 9, 30, 44]
    subs = {i: subscribe(net, i, "ticks", None) for i in subscribers}
    net.run(until=net.now + 3.0)
    for n in range(40):
        publish(net, 9, "ticks", {"n": n})
        publish(net, 12, "ticks", {"n": n})
        net.run(until=net.now + 0.01)
    net.run(until=net.now + 10.0)
    for index in subscribers:
        events = got(net, index, subs[index])
        for publisher in (net.overlays[9].node_id, net.overlays[12].node_id):
            sequences = [e.sequence for e in events if e.publisher == publisher]
            assert sequences == list(range(1, 41)), (index, publisher)
    held = sum(net.layer(i, PubSub).counters["held_back"] for i in subscribers)
    assert held > 0  # the jitter did reorder them


def test_at_least_once_reaches_subscribers_past_members_that_crashed():
    net = pubsub_net(80, seed=4)
    subscribers = random.Random(4).sample(range(1, 80), 16)
    subs = {i: subscribe(net, i, "alerts", None) for i in subscribers}
    net.run(until=net.now + 2.0)
    crashed = set(subscribers[:4])
    for index in crashed:
        net.crash(index)
    publish(net, 0, "alerts", {"n": 1}, reliable=True)
    publish(net, subscribers[-1], "alerts", {"n": 2}, reliable=True)
    net.run(until=net.now + 20.0)
    for index in set(subscribers) - crashed:
        assert sorted(e.attributes["n"] for e in got(net, index, subs[index])) == [1, 2], index


def test_an_unsubscribed_node_stops_receiving():
    net = pubsub_net(40, seed=5)
    a, b = subscribe(net, 5, "news", None), subscribe(net, 6, "news", None)
    net.run(until=net.now + 2.0)
    publish(net, 7, "news", {"n": 1})
    net.run(until=net.now + 2.0)
    net.call(5, lambda stack, now: stack.layer(PubSub).unsubscribe(a, now))
    net.run(until=net.now + 2.0)
    publish(net, 7, "news", {"n": 2})
    net.run(until=net.now + 2.0)
    assert [e.attributes["n"] for e in got(net, 5, a)] == [1]
    assert [e.attributes["n"] for e in got(net, 6, b)] == [1, 2]
    assert not net.layer(5, Multicast).is_member(GROUP_PREFIX + "news")
