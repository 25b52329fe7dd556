"""The overlay's stores against one contract: in memory (``LocalStore``) and in SQLite
(``SQLiteOverlayStore``), and what only the durable one does: survive a restart of the process
and of its clock, drop what expired meanwhile, and keep its file to its owner."""

from __future__ import annotations

import random
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig, Store, StoreReply
from p2pdeploy.overlay.storage import FULL, Item, LocalStore, Publication, item_bytes, sign_record
from p2pdeploy.runtime.overlay_store import OVERLAY_DATABASE_FILE, SQLiteOverlayStore

WRITER = Identity.from_seed(bytes(32))


def open_sqlite(path: Path, max_items: int, max_bytes: int, *, offset: float = 1_000_000.0, now: float = 0.0):
    return SQLiteOverlayStore(path, wall_clock_offset_s=offset, now=now, max_items=max_items, max_bytes=max_bytes)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    """A factory of empty stores of one kind: ``make_store(max_items, max_bytes)``."""
    opened = []

    def make(max_items: int = 100, max_bytes: int = 1 << 20):
        if request.param == "memory":
            return LocalStore(max_items, max_bytes)
        store = open_sqlite(tmp_path / f"store{len(opened)}", max_items, max_bytes)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# -- the contract --------------------------------------------------------------------------------


def test_a_stored_item_is_served_until_it_expires_then_removed(make_store):
    store = make_store()
    assert store.put(1, Item(b"one"), 10.0, now=0.0) is None
    held = store.get(1, 5.0)
    assert held.item == Item(b"one") and held.expires_at == 10.0 and held.refreshed_at == 0.0 and not held.cached
    assert 1 in store and len(store) == 1 and store.used_bytes() == 3
    assert store.get(1, 10.0) is None
    assert 1 not in store and len(store) == 0 and store.used_bytes() == 0


def test_storing_the_same_item_again_never_shortens_its_life(make_store):
    store = make_store()
    store.put(1, Item(b"v"), 100.0, now=0.0)
    store.put(1, Item(b"v"), 10.0, now=50.0)  # a replica passing on less time than we have
    assert store.get(1, 60.0).expires_at == 100.0
    store.put(1, Item(b"w"), 10.0, now=60.0)  # a new plain value replaces, with its own TTL
    assert store.get(1, 61.0).expires_at == 70.0 and store.get(1, 61.0).item == Item(b"w")


def test_a_signed_record_only_moves_forward_and_a_cache_copy_never_displaces_a_replica(make_store):
    store = make_store()
    key, second = sign_record(WRITER, b"name", b"second", 2)
    _, first = sign_record(WRITER, b"name", b"first", 1)
    assert store.put(key, second, 100.0, now=0.0) is None
    assert "older" in store.put(key, first, 100.0, now=1.0)
    assert "cannot be overwritten" in store.put(key, Item(b"plain"), 100.0, now=1.0)
    assert store.get(key, 2.0).item == second
    assert store.put(7, Item(b"replica"), 100.0, now=0.0) is None
    assert store.put(7, Item(b"cached"), 100.0, now=1.0, cached=True) is None  # accepted, ignored
    assert store.get(7, 2.0).item == Item(b"replica") and not store.get(7, 2.0).cached
    assert store.put(8, Item(b"c"), 100.0, now=0.0, cached=True) is None and store.get(8, 1.0).cached


def test_the_caps_on_count_and_bytes_refuse_what_would_pass_them(make_store):
    store = make_store(max_items=3, max_bytes=100)
    for key in range(3):
        assert store.put(key, Item(b"x" * 10), 100.0, now=0.0) is None
    assert store.put(3, Item(b"x"), 100.0, now=0.0) == FULL  # a fourth item
    assert store.put(0, Item(b"y" * 80), 100.0, now=0.0) is None  # a replacement adds no item: 80+10+10
    assert store.put(1, Item(b"z" * 81), 100.0, now=0.0) == FULL  # 80+81+10 bytes
    assert store.get(1, 1.0).item == Item(b"x" * 10)
    assert len(store) == 3 and store.used_bytes() == 100
    store.expire(100.0)
    assert store.put(3, Item(b"x" * 100), 100.0, now=100.0) is None  # room again once expired


def test_a_record_weighs_its_key_name_and_signature_too(make_store):
    key, record = sign_record(WRITER, b"name", b"v", 1)
    weight = item_bytes(record)
    assert weight == 1 + 32 + 4 + 64
    store = make_store(max_bytes=weight - 1)
    assert store.put(key, record, 100.0, now=0.0) == FULL


def test_expire_drops_exactly_the_items_whose_time_is_up(make_store):
    store = make_store()
    for key in range(6):
        store.put(key, Item(b"v%d" % key), 10.0 * (key + 1), now=0.0)
    assert store.expire(30.0) == 3
    assert sorted(key for key, _ in store.items()) == [3, 4, 5]
    assert store.used_bytes() == 6


def test_refreshed_notes_when_an_item_went_out_again(make_store):
    store = make_store()
    store.put(1, Item(b"v"), 100.0, now=0.0)
    store.refreshed(1, 40.0)
    store.refreshed(2, 40.0)  # nothing held: nothing to note
    assert store.get(1, 41.0).refreshed_at == 40.0 and store.get(1, 41.0).expires_at == 100.0
    assert 2 not in store


def test_the_republish_list_keeps_what_was_published_until_unpublished(make_store):
    store = make_store()
    key, record = sign_record(WRITER, b"n", b"v", (1 << 64) - 1)  # the largest sequence there is
    store.publish(key, Publication(record, 3600.0, 86400.0))
    store.publish(5, Publication(Item(b"five"), 60.0, 100.0))
    store.publish(5, Publication(Item(b"five"), 60.0, 200.0))
    assert store.publications() == {key: Publication(record, 3600.0, 86400.0),
                                    5: Publication(Item(b"five"), 60.0, 200.0)}
    store.unpublish(5)
    store.unpublish(6)
    assert list(store.publications()) == [key]
    assert len(store) == 0  # publishing is not holding


def test_a_hostile_peer_cannot_grow_a_nodes_store_past_its_caps(make_store):
    config = KademliaConfig(max_stored_items=50, max_stored_bytes=20_000, max_value_bytes=1000)
    store = make_store(config.max_stored_items, config.max_stored_bytes)
    node = Kademlia(1, random.Random(0), config, store=store)
    rng = random.Random(2)
    refused = 0
    for rpc_id in range(1, 301):
        value = rng.randbytes(rng.randrange(1, 1001))
        node.receive(("10.0.0.9", 4000), Store(rpc_id, 666, rng.getrandbits(160), Item(value), 3600.0), 0.0)
        replies = [msg for _, msg in node.messages_to_send() if isinstance(msg, StoreReply)]
        refused += not replies[-1].ok
        assert len(store) <= 50 and store.used_bytes() <= 20_000
    assert refused > 200 and node.dropped["store_refused"] == refused


# -- both stores answer alike ------------------------------------------------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 7), st.binary(max_size=40), st.floats(1.0, 50.0),
                  st.booleans()),
        st.tuples(st.just("get"), st.integers(0, 7)),
        st.tuples(st.just("refreshed"), st.integers(0, 7)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("publish"), st.integers(0, 3), st.binary(max_size=10)),
        st.tuples(st.just("unpublish"), st.integers(0, 3)),
        st.tuples(st.just("wait"), st.floats(0.0, 20.0)),
    ),
    max_size=40,
)


def _apply(store, operation, now: float):
    kind = operation[0]
    if kind == "put":
        _, key, value, ttl_s, cached = operation
        return store.put(key, Item(value), ttl_s, now, cached=cached)
    if kind == "get":
        return store.get(operation[1], now)
    if kind == "refreshed":
        return store.refreshed(operation[1], now)
    if kind == "expire":
        return store.expire(now)
    if kind == "publish":
        return store.publish(operation[1], Publication(Item(operation[2]), 60.0, now + 30.0))
    return store.unpublish(operation[1])


def _contents(store, now: float, shift_s: float = 0.0):
    """The items not expired (nor within a rounding error of it), times moved by ``shift_s`` and
    rounded: converting to wall-clock time and back is a float sum, not exact."""
    return sorted((key, s.item, round(s.expires_at + shift_s, 6), round(s.refreshed_at + shift_s, 6), s.cached)
                  for key, s in store.items() if s.expires_at > now + 1e-6)


@settings(max_examples=60)
@given(operations=OPERATIONS)
def test_both_stores_answer_alike_stay_within_their_caps_and_the_file_holds_the_same(operations):
    """The invariant: for any sequence of calls the SQLite store answers as the memory store does,
    neither passes its caps, ``used_bytes`` is what the items weigh, and reopening the file
    (another process, another clock) gives back the same unexpired items and republish list."""
    memory = LocalStore(5, 100)
    with tempfile.TemporaryDirectory() as directory:
        durable = open_sqlite(Path(directory), 5, 100, offset=1000.0)
        now = 0.0
        try:
            for operation in operations:
                if operation[0] == "wait":
                    now += operation[1]
                    continue
                assert _apply(durable, operation, now) == _apply(memory, operation, now), operation
                for store in (memory, durable):
                    assert len(store) <= 5 and store.used_bytes() <= 100
                    assert store.used_bytes() == sum(item_bytes(s.item) for _, s in store.items())
            assert _contents(durable, now) == _contents(memory, now)
            assert durable.publications() == memory.publications()
        finally:
            durable.close()
        # the next process: its clock started 500 s later on the wall, so its times are 500 less
        with open_sqlite(Path(directory), 5, 100, offset=1500.0, now=now - 500.0) as reopened:
            assert _contents(reopened, now - 500.0) == _contents(memory, now, shift_s=-500.0)
            assert {k: (p.item, p.ttl_s) for k, p in reopened.publications().items()} == {
                k: (p.item, p.ttl_s) for k, p in memory.publications().items()}


# -- what only the durable store does ------------------------------------------------------------


def test_a_reopened_store_serves_what_it_held_with_the_same_wall_clock_expiry(tmp_path):
    key, record = sign_record(WRITER, b"name", b"value", 3)
    # first process: its clock read 0 when the wall read 1,000,000
    with open_sqlite(tmp_path, 10, 1000, offset=1_000_000.0, now=0.0) as store:
        store.put(key, record, 600.0, now=100.0)
        store.put(9, Item(b"cached"), 300.0, now=100.0, cached=True)
        store.publish(key, Publication(record, 600.0, 3700.0))
    # second process, started 200 s (wall) later: its clock reads 5 at wall 1,000,300
    with open_sqlite(tmp_path, 10, 1000, offset=1_000_295.0, now=5.0) as store:
        held = store.get(key, 5.0)
        assert held.item == record and held.expires_at == pytest.approx(700.0 - 295.0)
        assert held.refreshed_at == pytest.approx(100.0 - 295.0)
        assert store.get(9, 5.0).cached
        assert store.publications() == {key: Publication(record, 600.0, pytest.approx(3700.0 - 295.0))}
        assert store.used_bytes() == item_bytes(record) + len(b"cached")


def test_what_expired_while_the_node_was_down_is_neither_served_nor_kept(tmp_path):
    with open_sqlite(tmp_path, 10, 1000, offset=0.0, now=0.0) as store:
        store.put(1, Item(b"short"), 60.0, now=0.0)
        store.put(2, Item(b"long"), 3600.0, now=0.0)
    with open_sqlite(tmp_path, 10, 1000, offset=100.0, now=0.0) as store:  # 100 s later
        assert store.get(1, 0.0) is None and 1 not in store
        assert store.get(2, 0.0).item == Item(b"long")
        assert store.used_bytes() == 4
        (rows,) = store.db.execute("SELECT COUNT(*) FROM items").fetchone()
        assert rows == 1


def test_a_store_reopened_with_smaller_caps_keeps_only_what_fits(tmp_path):
    with open_sqlite(tmp_path, 10, 1000) as store:
        for key in range(5):
            store.put(key, Item(b"x" * 10), 100.0 + key, now=0.0)
    with open_sqlite(tmp_path, 3, 1000) as store:
        assert sorted(key for key, _ in store.items()) == [2, 3, 4]  # the longest-lived kept
    with open_sqlite(tmp_path, 10, 15) as store:
        assert [key for key, _ in store.items()] == [4] and store.used_bytes() == 10


def test_the_database_file_is_the_owners_alone(tmp_path):
    with open_sqlite(tmp_path, 10, 1000) as store:
        store.put(1, Item(b"v"), 100.0, now=0.0)
        files = list(tmp_path.glob(OVERLAY_DATABASE_FILE + "*"))
        assert tmp_path / OVERLAY_DATABASE_FILE in files
        assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}


def test_a_write_that_fails_refuses_the_item_rather_than_holding_it_in_memory_only(tmp_path):
    store = open_sqlite(tmp_path, 10, 1000)
    store.put(1, Item(b"kept"), 100.0, now=0.0)
    store.close()  # what a failing disk looks like from here: every write raises
    reason = store.put(2, Item(b"lost"), 100.0, now=0.0)
    assert reason is not None and reason.startswith("cannot write the store")
    assert 2 not in store and store.write_errors == 1
