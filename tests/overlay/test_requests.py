"""The request tracker: ids, the expected peer, timeouts, the cap, and every request ending once."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy.core import Protocol
from p2pdeploy.overlay.requests import RequestsFull, RequestTracker


class Owner(Protocol):
    """A protocol object whose timer handler reports what timed out."""

    def __init__(self, **tracker_options):
        super().__init__()
        self.tracker = RequestTracker(self, "rpc", **tracker_options)
        self.timed_out = []

    def on_timer(self, name, now):
        request = self.tracker.timed_out(name)
        if request is not None:
            self.timed_out.append(request)

    def run_until(self, now):
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            self.handle_timer(max(deadline, 0.0))


def test_a_reply_from_the_expected_peer_ends_the_request_and_cancels_its_timer():
    owner = Owner(rng=random.Random(1))
    rid = owner.tracker.issue("data", 0.0, 2.0, address="b", node_id=7)
    assert owner.timer_deadline(("rpc", rid)) == 2.0
    request = owner.tracker.reply(rid, "b", 7)
    assert request is not None and request.data == "data" and request.sent_at == 0.0
    assert rid not in owner.tracker and owner.timer_deadline(("rpc", rid)) is None
    owner.run_until(10.0)
    assert owner.timed_out == [] and owner.dropped == Counter()


def test_a_reply_from_another_address_or_node_is_dropped_and_counted_under_the_layers_name():
    owner = Owner(rng=random.Random(1), unexpected="unsolicited_ack")
    rid = owner.tracker.issue("data", 0.0, 2.0, address="b", node_id=7)
    assert owner.tracker.reply(rid, "c", 7) is None  # right node id, wrong address
    assert owner.tracker.reply(rid, "b", 8) is None  # right address, wrong node id
    assert owner.tracker.reply(rid, "b") is None  # the sender did not say who it is
    assert owner.tracker.reply(rid + 1, "b", 7) is None  # unknown id
    assert owner.dropped == Counter({"unsolicited_ack": 4})
    owner.run_until(2.0)
    assert [r.request_id for r in owner.timed_out] == [rid]


def test_a_request_without_an_expected_peer_takes_a_reply_from_anyone():
    owner = Owner(rng=random.Random(1))
    rid = owner.tracker.issue(None, 0.0, 1.0)
    assert owner.tracker.reply(rid, "anyone", 123) is not None
    assert owner.tracker.reply(rid, "anyone", 123) is None  # a second copy ends nothing
    assert owner.dropped["unsolicited_reply"] == 1


def test_ids_come_from_the_rng_as_the_layers_drew_them_never_zero():
    rng = random.Random(5)
    expected = random.Random(5)
    owner = Owner(rng=rng, id_bits=62)
    draws = [owner.tracker.issue(i, 0.0, 1.0) for i in range(20)]
    assert draws == [expected.getrandbits(62) for _ in range(20)]
    tiny = Owner(rng=random.Random(3), id_bits=2, limit=3)
    assert sorted(tiny.tracker.issue(i, 0.0, 1.0) for i in range(3)) == [1, 2, 3]


def test_without_an_rng_ids_count_up_from_one():
    owner = Owner()
    assert [owner.tracker.issue(None, 0.0, 1.0) for _ in range(3)] == [1, 2, 3]


def test_at_the_limit_issue_raises_and_a_free_slot_takes_the_next():
    owner = Owner(rng=random.Random(1), limit=2, what="pings")
    first = owner.tracker.issue(None, 0.0, 1.0, address="a")
    owner.tracker.issue(None, 0.0, 5.0, address="a")
    assert owner.tracker.full
    with pytest.raises(RequestsFull, match="2 pings in flight"):
        owner.tracker.issue(None, 0.0, 1.0)
    owner.run_until(1.0)
    assert [r.request_id for r in owner.timed_out] == [first] and not owner.tracker.full
    owner.tracker.issue(None, 1.0, 1.0)


def test_bad_timeouts_and_limits_are_refused():
    owner = Owner(rng=random.Random(1))
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        owner.tracker.issue(None, 0.0, 0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        RequestTracker(owner, "x", limit=0)


def test_rearm_moves_the_timeout():
    owner = Owner(rng=random.Random(1))
    rid = owner.tracker.issue(None, 0.0, 1.0)
    owner.tracker.rearm(rid, 3.0)
    owner.run_until(2.0)
    assert owner.timed_out == []
    owner.run_until(3.0)
    assert [r.request_id for r in owner.timed_out] == [rid]


def test_another_timer_of_the_owner_is_not_the_trackers():
    owner = Owner(rng=random.Random(1))
    assert not owner.tracker.owns("rpc") and not owner.tracker.owns(("other", 1))
    assert owner.tracker.timed_out(("other", 1)) is None


# -- properties -----------------------------------------------------------------------------

PEERS = ("a", "b", "c")
operations = st.lists(
    st.one_of(
        st.tuples(st.just("issue"), st.sampled_from(PEERS), st.floats(0.1, 5.0)),
        st.tuples(st.just("reply"), st.integers(0, 30), st.sampled_from(PEERS)),
        st.tuples(st.just("end"), st.integers(0, 30)),
        st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(0, 2**32))
def test_every_request_ends_exactly_once_and_a_wrong_peer_never_ends_one(ops, seed):
    owner = Owner(rng=random.Random(seed), id_bits=5, limit=8)
    tracker = owner.tracker
    issued = {}  # request id -> expected address, for the requests in flight
    ended = Counter()  # every request ever issued -> how many times it ended
    generation = Counter()  # ids are reused once free: count requests, not ids
    now = 0.0
    for op in ops:
        if op[0] == "issue":
            if tracker.full:
                with pytest.raises(RequestsFull):
                    tracker.issue(None, now, op[2], address=op[1])
                continue
            rid = tracker.issue(None, now, op[2], address=op[1])
            assert rid not in issued and rid != 0
            issued[rid] = op[1]
            generation[rid] += 1
            ended[(rid, generation[rid])] += 0
        elif op[0] == "reply":
            rid, src = op[1], op[2]
            request = tracker.reply(rid, src)
            if rid in issued and issued[rid] == src:
                assert request is not None and request.request_id == rid
                del issued[rid]
                ended[(rid, generation[rid])] += 1
            else:
                assert request is None  # unknown, or from the wrong peer: nothing ends
                if rid in issued:
                    assert rid in tracker
        elif op[0] == "end":
            request = tracker.end(op[1])
            assert (request is not None) == (op[1] in issued)
            if request is not None:
                del issued[op[1]]
                ended[(op[1], generation[op[1]])] += 1
        else:
            now += op[1]
            owner.run_until(now)
            for request in owner.timed_out:
                assert request.deadline <= now
                del issued[request.request_id]
                ended[(request.request_id, generation[request.request_id])] += 1
            owner.timed_out.clear()
        assert set(issued) == {r.request_id for r in tracker} and len(tracker) == len(issued)
    owner.run_until(float("inf"))
    for request in owner.timed_out:
        del issued[request.request_id]
        ended[(request.request_id, generation[request.request_id])] += 1
    assert issued == {} and len(tracker) == 0
    assert all(count == 1 for count in ended.values())
    assert sum(tracker.counts[k] for k in ("answered", "timed_out", "ended")) == tracker.counts["issued"]
