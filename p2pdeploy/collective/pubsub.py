"""Publish/subscribe: topics on multicast groups, content filters, per-publisher order.

A topic ``T`` is the multicast group ``pubsub/T`` (:mod:`p2pdeploy.overlay.multicast`): a node
with at least one subscription to ``T`` is a member of that group, and publishing sends an
event (a flat mapping of attributes, see :mod:`p2pdeploy.collective.events`) to the group. Each
subscription has a content filter in the requirements language
(:mod:`p2pdeploy.collective.filters`), evaluated at the subscriber's node before delivery; the
library call is::

    sub = pubsub.subscribe("replicas", 'service == "wiki" and state in {"failed", "stopped"}', now)
    pubsub.publish("replicas", {"service": "wiki", "state": "failed", ...}, now)
    # -> Delivered(subscription_id=sub, topic="replicas", publisher=..., sequence=..., attributes={...})

Guarantees, and what they rest on:

- **Soft state.** A subscription lives in the group's member list at the nodes closest to the
  group id, refreshed every ``multicast.refresh_interval_s``; a subscriber that crashes is
  forgotten after ``2.5`` periods, one that comes back re-subscribes by itself (its node
  re-joins). A subscription is *active* (``is_active``) once the group's root has it on its
  list; events reach it from about ``multicast.view_push_delay_s`` plus a round trip later, when
  the root's view update has reached the other members. Events published before are not
  delivered to it.
- **Per-publisher order.** A publisher numbers its events per topic (1, 2, 3, ... within an
  ``epoch`` drawn when it starts). A subscriber delivers each publisher's events in that order:
  one that arrives early is held back until the gap fills or it has waited ``hold_back_s``, then
  the gap is skipped (those events count as lost, and a straggler from before the gap is dropped).
  A subscriber that joins while a publisher is under way waits ``hold_back_s`` once for that
  publisher's earlier events before its first delivery.
  Events of different publishers are not ordered with respect to each other.
- **At most once (default).** A subscriber delivers an event at most once (duplicates are
  dropped by sequence number); an event may be lost if a node on its path fails or a datagram
  is lost.
- **At least once (``publish(..., reliable=True)``).** Every hand-off in the group's tree is
  acknowledged and a block whose member failed is handed to another member; a publisher outside
  the group retries once with fresh entry members. An event reaches every subscriber that the
  root knew when it was published and that stays up, as long as its sender stays up until the
  first member accepted it; the subscriber still drops duplicates, so the application sees it
  once. The multicast layer's ``GroupSendFinished`` (group ``pubsub/T``) reports blocks that
  could not be reached.

Filters run at the subscriber, not inside the tree: every member of a topic's group receives
every event of the topic, and filtering inside the tree (pushing filters to the members that
forward) would save traffic for selective subscribers at the cost of state in the tree.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy import wire
from p2pdeploy.collective.events import from_attributes
from p2pdeploy.collective.filters import Filter, event_attributes
from p2pdeploy.core import Protocol, Rng, require_at_least, require_positive
from p2pdeploy.overlay.multicast import GroupDelivered, Multicast
from p2pdeploy.wire import NodeId, message

GROUP_PREFIX = "pubsub/"
MAX_TOPIC_CHARS = 200

AttributeValue = bool | int | float | str | list[str]


@message(70)
class PublishedEvent:
    """An event as it travels inside a group message (the payload of ``GroupData``)."""

    publisher: NodeId
    epoch: int
    topic: str
    sequence: int
    attributes: dict[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class PubSubConfig:
    #: An event that arrives before its predecessors waits at most this long for them.
    hold_back_s: float = 2.0
    #: Events held back per publisher and topic before the oldest gap is skipped.
    max_held: int = 1024
    #: A publisher not heard from for this long is forgotten (its next event starts a new order).
    stream_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        require_positive(self, "pubsub.", "hold_back_s", "stream_ttl_s")
        require_at_least(self, "pubsub.", 1, "max_held")


@dataclass(frozen=True, slots=True)
class Delivered:
    """An event that matched the subscription ``subscription_id`` on this node."""

    subscription_id: int
    topic: str
    publisher: int
    sequence: int
    attributes: dict[str, Any]

    def standard_event(self) -> Any:
        """The event as one of :mod:`p2pdeploy.collective.events`' types (None for another kind)."""
        return from_attributes(self.attributes)


@dataclass(slots=True)
class _Subscription:
    subscription_id: int
    topic: str
    filter: Filter


@dataclass(slots=True)
class _Stream:
    """Order keeping for one (publisher, epoch, topic)."""

    next_sequence: int = 1
    held: dict[int, tuple[PublishedEvent, float]] = field(default_factory=dict)  # sequence -> (event, arrived)
    last_heard: float = 0.0


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"a topic is a non-empty string (got {topic!r})")
    if len(topic) > MAX_TOPIC_CHARS:
        raise ValueError(f"a topic has at most {MAX_TOPIC_CHARS} characters (got {len(topic)})")
    return topic


class PubSub(Protocol):
    """Publish/subscribe on one node, above a :class:`~p2pdeploy.overlay.multicast.Multicast` layer.

    It sends nothing itself: its events ride in group messages, and it consumes the multicast
    layer's ``GroupDelivered`` events of the topics' groups (``pubsub/T``) it joined.
    """

    handles = ()
    consumes = (GroupDelivered,)

    def __init__(self, multicast: Multicast, rng: Rng, config: PubSubConfig | None = None) -> None:
        super().__init__()
        self.multicast = multicast
        self.rng = rng
        self.config = config or PubSubConfig()
        self.epoch = rng.getrandbits(63)
        self._subscriptions: dict[int, _Subscription] = {}
        self._by_topic: dict[str, list[_Subscription]] = {}
        self._next_subscription = 0
        self._sequences: dict[str, int] = {}
        self._streams: dict[tuple[int, int, str], _Stream] = {}
        self.counters: dict[str, int] = {"published": 0, "received": 0, "delivered": 0, "filtered_out": 0,
                                         "duplicates": 0, "held_back": 0, "skipped": 0}

    # -- API -------------------------------------------------------------------------------
    def subscribe(self, topic: str, filter_expr: str | None, now: float) -> int:
        """Deliver events of ``topic`` that match ``filter_expr`` (None or "" for all) as
        :class:`Delivered` events; the subscription id. Raises ``FilterError`` for a bad filter."""
        check_topic(topic)
        parsed = Filter.parse(filter_expr)
        self._next_subscription += 1
        subscription = _Subscription(self._next_subscription, topic, parsed)
        self._subscriptions[subscription.subscription_id] = subscription
        subscribers = self._by_topic.setdefault(topic, [])
        subscribers.append(subscription)
        if len(subscribers) == 1:
            self.multicast.join(GROUP_PREFIX + topic, now)
        return subscription.subscription_id

    def unsubscribe(self, subscription_id: int, now: float) -> None:
        """End a subscription (an unknown id is a ``KeyError``); the last one of a topic leaves its group."""
        subscription = self._subscriptions.pop(subscription_id, None)
        if subscription is None:
            raise KeyError(f"no subscription {subscription_id} on this node")
        subscribers = self._by_topic[subscription.topic]
        subscribers.remove(subscription)
        if not subscribers:
            del self._by_topic[subscription.topic]
            self.multicast.leave(GROUP_PREFIX + subscription.topic, now)

    def publish(self, topic: str, attributes: Mapping[str, Any], now: float, *, reliable: bool = False) -> int:
        """Publish an event (attributes: bool, number, string or set of strings); its sequence number."""
        check_topic(topic)
        values = event_attributes(attributes)
        sequence = self._sequences.get(topic, 0) + 1
        payload = wire.encode(PublishedEvent(self.multicast.own_id, self.epoch, topic, sequence, values))
        if len(payload) > self.multicast.spread_config.max_payload_bytes:
            raise ValueError(f"event of {len(payload)} bytes is over the multicast max_payload_bytes "
                             f"({self.multicast.spread_config.max_payload_bytes})")
        self._sequences[topic] = sequence
        self.counters["published"] += 1
        self.multicast.send_to(GROUP_PREFIX + topic, payload, now, reliable=reliable)
        return sequence

    # -- read-only views -------------------------------------------------------------------
    def subscriptions(self) -> dict[int, tuple[str, str]]:
        """Subscription id -> (topic, canonical filter text)."""
        return {s.subscription_id: (s.topic, str(s.filter)) for s in self._subscriptions.values()}

    def is_active(self, subscription_id: int) -> bool:
        """True once the topic's group root knows this node (events published from now reach it)."""
        subscription = self._subscriptions.get(subscription_id)
        return subscription is not None and self.multicast.is_joined(GROUP_PREFIX + subscription.topic)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Any, msg: Any, now: float) -> None:
        self.dropped["unexpected"] += 1  # nothing is addressed to this layer directly

    def handle_event(self, event: Any, now: float) -> bool:
        """A message of a topic's group: this layer's whether or not it is well formed."""
        if not (isinstance(event, GroupDelivered) and event.name.startswith(GROUP_PREFIX)):
            return False
        self._on_group_message(event, now)
        return True

    def _on_group_message(self, delivered: GroupDelivered, now: float) -> None:
        event = wire.decode(delivered.payload, limit_bytes=len(delivered.payload))
        if not isinstance(event, PublishedEvent):
            self.dropped["malformed_event"] += 1
            return
        if delivered.name != GROUP_PREFIX + event.topic or event.publisher != delivered.origin:
            self.dropped["misaddressed_event"] += 1
            return
        if event.sequence < 1:
            self.dropped["malformed_event"] += 1
            return
        self.counters["received"] += 1
        key = (event.publisher, event.epoch, event.topic)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream()
            if self.timer_deadline("sweep") is None:
                self.set_timer("sweep", now + self.config.stream_ttl_s)
        stream.last_heard = now
        if event.sequence < stream.next_sequence or event.sequence in stream.held:
            self.counters["duplicates"] += 1
            return
        if event.sequence > stream.next_sequence:
            self.counters["held_back"] += 1
            stream.held[event.sequence] = (event, now)
            if len(stream.held) > self.config.max_held:
                self._skip_gap(key, stream)
            if stream.held and self.timer_deadline(("hold", key)) is None:
                self.set_timer(("hold", key), now + self.config.hold_back_s)
            return
        self._release(event)
        stream.next_sequence += 1
        self._release_held(key, stream)

    def _release_held(self, key: tuple[int, int, str], stream: _Stream) -> None:
        while stream.next_sequence in stream.held:
            self._release(stream.held.pop(stream.next_sequence)[0])
            stream.next_sequence += 1
        if not stream.held:
            self.cancel_timer(("hold", key))

    def _skip_gap(self, key: tuple[int, int, str], stream: _Stream) -> None:
        first = min(stream.held)
        self.counters["skipped"] += first - stream.next_sequence
        stream.next_sequence = first
        self._release_held(key, stream)

    def _release(self, event: PublishedEvent) -> None:
        for subscription in self._by_topic.get(event.topic, ()):
            if subscription.filter.matches(event.attributes):
                self.counters["delivered"] += 1
                self.emit(Delivered(subscription.subscription_id, event.topic, event.publisher, event.sequence,
                                    dict(event.attributes)))
            else:
                self.counters["filtered_out"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "sweep":
            horizon = now - self.config.stream_ttl_s
            for key in [k for k, s in self._streams.items() if s.last_heard <= horizon and not s.held]:
                del self._streams[key]
            if self._streams:
                self.set_timer("sweep", now + self.config.stream_ttl_s)
            return
        if isinstance(name, tuple) and name[0] == "hold":
            key = name[1]
            stream = self._streams.get(key)
            # every event that waited hold_back_s goes out now, skipping the gaps before it
            while stream is not None and stream.held:
                first = min(stream.held)
                arrived = stream.held[first][1]
                if arrived + self.config.hold_back_s > now:
                    self.set_timer(name, arrived + self.config.hold_back_s)
                    break
                self._skip_gap(key, stream)


__all__ = ["GROUP_PREFIX", "Delivered", "PubSub", "PubSubConfig", "PublishedEvent", "check_topic"]
