"""The sans-I/O contract: timers, output buffers and the stack that routes by message type."""

import random

import pytest

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay import ping as ping_module
from p2pdeploy.overlay.ping import MIN_RTO_S, Ping, PingProtocol, PingTimedOut, Pong, PongReceived
from p2pdeploy.overlay.requests import RequestsFull


class _Timers(Protocol):
    def __init__(self):
        super().__init__()
        self.fired = []

    def on_timer(self, name, now):
        self.fired.append((name, now))


def test_timers_fire_in_deadline_order_and_cancelled_ones_never_fire():
    p = _Timers()
    p.set_timer("b", 2.0)
    p.set_timer("a", 1.0)
    p.set_timer("c", 3.0)
    p.cancel_timer("b")
    p.set_timer("a", 2.5)  # moved: only the new deadline counts
    assert p.next_deadline() == 2.5
    p.handle_timer(2.4)
    assert p.fired == []
    p.handle_timer(3.0)
    assert p.fired == [("a", 3.0), ("c", 3.0)]
    assert p.next_deadline() is None


def _pair():
    a = PingProtocol(1, random.Random(1))
    b = PingProtocol(2, random.Random(2))
    return a, b


def test_ping_measures_rtt_and_the_pong_echoes_the_payload():
    a, b = _pair()
    nonce = a.ping("b", now=10.0, payload=b"hello")
    [(dst, msg)] = a.messages_to_send()
    assert dst == "b" and msg == Ping(nonce, 1, b"hello")
    b.receive("a", msg, now=10.02)
    [(dst, reply)] = b.messages_to_send()
    assert dst == "a" and reply == Pong(nonce, 2, b"hello")
    a.receive("b", reply, now=10.05)
    events = [a.next_event(), a.next_event()]
    received = events[1]
    assert isinstance(received, PongReceived)
    assert received.rtt_s == pytest.approx(0.05) and received.payload_bytes == 5
    assert a.next_deadline() is None  # the timeout was cancelled


def test_unanswered_ping_times_out_at_the_rto_and_backs_off():
    a, _ = _pair()
    nonce = a.ping("b", now=0.0)
    assert a.next_deadline() == pytest.approx(1.0)
    a.handle_timer(a.next_deadline())
    assert a.next_event() == PingTimedOut("b", nonce)


def test_a_ping_given_its_own_timeout_waits_that_long_whatever_the_rto():
    a, b = _pair()
    a.ping("b", now=0.0)
    [(_, msg)] = a.messages_to_send()
    b.receive("a", msg, now=0.001)
    [(_, reply)] = b.messages_to_send()
    a.receive("b", reply, now=0.002)
    assert a.estimate("b").rto_s == pytest.approx(MIN_RTO_S)  # a fast link: the RTO is at its floor
    nonce = a.ping("b", now=1.0, timeout_s=5.0)
    assert a.next_deadline() == pytest.approx(6.0)
    a.handle_timer(1.0 + MIN_RTO_S + 0.5)
    assert all(not isinstance(e, PingTimedOut) for e in iter(a.next_event, None))
    a.handle_timer(6.0)
    assert PingTimedOut("b", nonce) in list(iter(a.next_event, None))
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        a.ping("b", now=7.0, timeout_s=0)


def test_a_pong_from_the_wrong_address_or_nonce_is_dropped_and_counted():
    a, b = _pair()
    nonce = a.ping("b", now=0.0)
    a.receive("mallory", Pong(nonce, 9, b""), now=0.1)
    a.receive("b", Pong(nonce + 1, 2, b""), now=0.1)
    assert a.dropped["unsolicited_pong"] == 2
    assert a.next_event() is None


def test_at_the_cap_a_ping_call_raises_and_the_periodic_round_skips(monkeypatch):
    monkeypatch.setattr(ping_module, "MAX_OUTSTANDING", 2)
    a = PingProtocol(1, random.Random(1), interval_s=1.0, peers=["b", "c"], own_address="a")
    a.ping("b", now=0.0, timeout_s=50)
    a.ping("c", now=0.0, timeout_s=50)
    with pytest.raises(RequestsFull, match="2 pings in flight"):
        a.ping("b", now=0.0)
    a.messages_to_send()
    a.start(0.0)
    a.handle_timer(1.5)  # the round is due: no room, so no ping and no exception
    assert a.messages_to_send() == [] and a.stats.sent == 2
    a.handle_timer(50.0)  # both time out: the next round pings again
    a.handle_timer(51.5)
    assert [type(m) for _, m in a.messages_to_send()] == [Ping]


def test_stack_routes_by_type_and_counts_what_no_layer_handles():
    ping = PingProtocol(1, random.Random(1))
    stack = Stack([ping])
    stack.receive("x", Ping(5, 2, b""), now=0.0)
    assert stack.messages_to_send() == [("x", Pong(5, 1, b""))]
    stack.receive("x", object(), now=0.0)
    assert stack.dropped["unexpected"] == 1
    with pytest.raises(ValueError, match="two layers"):
        Stack([PingProtocol(1, random.Random(1)), PingProtocol(2, random.Random(2))])


# -- events flowing upward -------------------------------------------------------------------


class _Emitter(Protocol):
    """A lower layer: ``work(tag, now)`` emits ``Done(tag)``."""

    def work(self, tag, now):
        self.emit(_Done(tag))


class _Done:
    def __init__(self, tag):
        self.tag = tag


class _Caller(Protocol):
    """An upper layer: consumes the ``_Done`` of the work it started, and starts more below."""

    consumes = (_Done,)

    def __init__(self, lower, chain=0):
        super().__init__()
        self.lower = lower
        self.mine = set()
        self.seen = []
        self.chain = chain

    def start(self, tag, now):
        self.mine.add(tag)
        self.lower.work(tag, now)

    def handle_event(self, event, now):
        self.seen.append((event.tag, now))
        if event.tag not in self.mine:
            return False
        self.mine.discard(event.tag)
        if self.chain:
            self.chain -= 1
            self.start(f"{event.tag}+", now)  # an event caused while handling one is offered too
        else:
            self.emit(f"finished {event.tag}")
        return True


def test_a_layer_consumes_the_events_of_its_own_work_and_the_driver_gets_the_rest():
    lower = _Emitter()
    upper = _Caller(lower)
    stack = Stack([lower, upper])
    upper.start("a", 1.0)
    lower.work("b", 1.0)  # someone else's work: the upper layer looks, does not consume
    event = stack.next_event(2.0)  # lower layers' events come first
    assert isinstance(event, _Done) and event.tag == "b"
    assert stack.next_event(2.0) == "finished a"
    assert stack.next_event(2.0) is None
    assert upper.seen == [("a", 2.0), ("b", 2.0)]
    assert stack.consumed == {"_Done": 1}


def test_events_caused_while_handling_an_event_are_offered_in_the_same_drain():
    lower = _Emitter()
    upper = _Caller(lower, chain=2)
    stack = Stack([lower, upper])
    upper.start("a", 0.0)
    assert stack.next_event(1.0) == "finished a++"
    assert stack.next_event(1.0) is None


def test_a_layer_never_consumes_the_events_of_layers_above_it():
    upper_emitter = _Emitter()
    lower = _Caller(upper_emitter)
    stack = Stack([lower, upper_emitter])  # the consumer sits below the emitter
    lower.start("a", 0.0)
    event = stack.next_event(1.0)
    assert isinstance(event, _Done) and lower.seen == []


def test_the_time_of_the_last_input_is_used_when_the_driver_gives_none():
    lower = _Emitter()
    upper = _Caller(lower)
    stack = Stack([lower, upper])
    stack.handle_timer(5.0)
    upper.start("a", 5.0)
    assert stack.next_event() == "finished a"
    assert upper.seen == [("a", 5.0)]
    fresh = Stack([_Emitter(), _Caller(_Emitter())])
    fresh.layers[0].work("x", 0.0)
    with pytest.raises(RuntimeError, match="pass now"):
        fresh.next_event()


# -- keyed children ---------------------------------------------------------------------------


class _Child(Protocol):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def on_timer(self, name, now):
        self.emit((self.name, name, now))
        self.send(f"peer-of-{self.name}", name)


def test_keyed_children_run_due_timers_and_their_output_reaches_the_owner_in_insertion_order():
    from p2pdeploy.core import KeyedChildren

    owner = _Timers()
    children: KeyedChildren[str, _Child] = KeyedChildren()
    children["b"], children["a"] = _Child("b"), _Child("a")
    children["b"].set_timer("t", 2.0)
    children["a"].set_timer("t", 1.0)
    children["a"].set_timer("later", 9.0)
    assert children.next_deadline() == 1.0
    children.handle_timer(2.0)
    children.drain(owner)
    assert [owner.next_event(), owner.next_event(), owner.next_event()] == [("b", "t", 2.0), ("a", "t", 2.0), None]
    assert owner.messages_to_send() == [("peer-of-b", "t"), ("peer-of-a", "t")]
    assert children.next_deadline() == 9.0
    del children["a"]
    assert children.next_deadline() is None and "a" not in children and len(children) == 1
