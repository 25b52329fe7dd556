"""The SQLite store: chunks as files named by hash, the index and records in SQLite, and what
survives a crash or a damaged disk."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pdeploy.collective.blobs import chunk_key
from p2pdeploy.collective.persistence import sign_pin
from p2pdeploy.collective.records import ZERO, AcceptorState, Ballot
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import sign_record
from p2pdeploy.runtime.store_sqlite import SQLiteStore, capacity_from


def chunk(seed: int, size: int = 5000) -> tuple[int, bytes]:
    data = random.Random(seed).randbytes(size)
    return chunk_key(data), data


def test_a_chunk_is_a_file_named_by_its_sha256_and_reads_back_verified(tmp_path):
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        key, data = chunk(1)
        assert store.write_chunk(key, data, 3) is None
        path = store.path_of(hashlib.sha256(data).digest())
        assert path.read_bytes() == data and path.name == hashlib.sha256(data).hexdigest()
        assert store.read_chunk(key) == data
        info = store.chunk_info(key)
        assert (info.size, info.replicas, info.pinned) == (len(data), 3, False)
        assert store.write_chunk(key, data, 5, pinned=True) is None  # again: metadata only
        assert store.chunk_info(key).replicas == 5 and store.chunk_info(key).pinned
        assert store.used_bytes() == len(data)
        store.delete_chunk(key)
        assert store.read_chunk(key) is None and not path.exists() and store.used_bytes() == 0


def test_a_restarted_store_serves_what_it_held(tmp_path):
    writer = Identity.from_seed(bytes(32))
    record_key_, item = sign_record(writer, b"name", b"value", 4)
    state = AcceptorState(7, Ballot(2, 9, 1), Ballot(2, 9, 1), item, [Contact(9, ("127.0.0.1", 7400))])
    key, data = chunk(2)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        store.write_chunk(key, data, 2)
        store.write_record(record_key_, item, 3)
        store.write_acceptor(state)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        assert store.read_chunk(key) == data
        assert [info.key for info in store.chunk_infos()] == [key]
        assert store.read_record(record_key_) == (item, 3) and store.record_keys() == [record_key_]
        assert store.read_acceptor(7) == state
        assert store.used_bytes() == len(data)
        assert store.take_corrupted() == []


def test_a_chunk_damaged_on_disk_is_detected_dropped_and_reported(tmp_path):
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        key, data = chunk(3)
        store.write_chunk(key, data, 3, pinned=True)
        path = store.path_of(hashlib.sha256(data).digest())
        path.write_bytes(b"X" + data[1:])
        assert not store.verify_chunk(key)
        assert store.read_chunk(key) is None and store.chunk_info(key) is None
        (info,) = store.take_corrupted()
        assert (info.key, info.replicas, info.pinned) == (key, 3, True)
        assert store.corruptions == 1 and store.used_bytes() == 0


def test_opening_reconciles_files_and_index_after_a_crash(tmp_path):
    key, data = chunk(4)
    lost_key, lost = chunk(5)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        store.write_chunk(key, data, 3)
        store.write_chunk(lost_key, lost, 2)
        orphan = store.path_of(hashlib.sha256(b"never indexed").digest())
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"never indexed")  # the crash came between the file and its row
        tmp = orphan.with_name(".half-written.tmp")
        tmp.write_bytes(b"half")
        store.path_of(hashlib.sha256(lost).digest()).unlink()  # the disk lost a file
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        assert not orphan.exists() and not tmp.exists()
        assert store.read_chunk(key) == data
        assert store.chunk_info(lost_key) is None
        assert [info.key for info in store.take_corrupted()] == [lost_key]  # to fetch again
        assert store.used_bytes() == len(data)


def test_the_quota_refuses_chunks_beyond_the_owners_share_of_disk(tmp_path):
    contribution = Contribution(disk_bytes=20_000)
    assert capacity_from(contribution) == 10_000
    assert capacity_from(contribution, 1.0) == 20_000
    with pytest.raises(ValueError, match="share must be in"):
        capacity_from(contribution, 0)
    with SQLiteStore(tmp_path, capacity_bytes=capacity_from(contribution)) as store:
        first_key, first = chunk(6, 6000)
        second_key, second = chunk(7, 6000)
        assert store.write_chunk(first_key, first, 3) is None
        assert store.write_chunk(second_key, second, 3) == "store is full"
        assert store.chunk_info(second_key) is None


def test_records_and_acceptor_states_replace_older_ones(tmp_path):
    writer = Identity.from_seed(bytes(range(32)))
    key, old = sign_record(writer, b"n", b"old", 1)
    _, new = sign_record(writer, b"n", b"new", 2)
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        store.write_record(key, old, 3)
        store.write_record(key, new, 3)
        assert store.read_record(key) == (new, 3)
        store.delete_record(key)
        assert store.read_record(key) is None
        store.write_acceptor(AcceptorState(5, Ballot(1, 1, 1)))
        store.write_acceptor(AcceptorState(5, Ballot(2, 1, 1)))
        assert store.read_acceptor(5).promised == Ballot(2, 1, 1)
        assert store.read_acceptor(6) is None


def test_a_chunks_pin_owner_and_time_survive_a_restart(tmp_path):
    key, data = chunk(7)
    pin = sign_pin(Identity.from_seed(bytes(32)), key, 1_900_000_000)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        assert store.write_chunk(key, data, 3, pin=pin, owner=1 << 159, since=12.5) is None
        other, other_data = chunk(8)
        store.write_chunk(other, other_data, 3)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        info = store.chunk_info(key)
        assert (info.pin, info.owner, info.since) == (pin, 1 << 159, 12.5) and pin.verifies()
        assert store.chunk_info(other).pin is None and store.chunk_info(other).owner == 0
        renewed = sign_pin(Identity.from_seed(bytes(32)), other, 1_900_000_100)
        store.set_pin(other, renewed)
        assert [i.pin for i in store.chunk_infos() if i.key == other] == [renewed]


def test_a_store_from_before_pins_gains_their_columns_and_keeps_its_chunks(tmp_path):
    import sqlite3

    key, data = chunk(9)
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        store.write_chunk(key, data, 3)
    db = sqlite3.connect(tmp_path / "persistence" / "store.sqlite3")
    db.executescript("""
        CREATE TABLE old AS SELECT key, digest, size, replicas, pinned FROM chunks;
        DROP TABLE chunks;
        ALTER TABLE old RENAME TO chunks;
    """)
    db.close()
    with SQLiteStore(tmp_path, capacity_bytes=1 << 20) as store:
        info = store.chunk_info(key)
        assert store.read_chunk(key) == data and info.pin is None and info.since == 0


def test_records_and_acceptor_states_keep_when_they_were_written_across_a_restart(tmp_path):
    writer = Identity.from_seed(bytes(range(32)))
    key, item = sign_record(writer, b"n", b"v", 1)
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        store.write_record(key, item, 3, since=100.0)
        store.write_record(key, item, 5)  # more replicas only: the version keeps its time
        store.write_acceptor(AcceptorState(5, Ballot(1, 1, 1)), since=200.0)
        store.write_acceptor(AcceptorState(6, Ballot(1, 1, 1)), since=300.0)
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        assert store.read_record(key) == (item, 5) and store.record_times() == {key: 100.0}
        assert store.acceptor_times() == {5: 200.0, 6: 300.0}
        store.delete_acceptor(5)
        assert store.read_acceptor(5) is None and store.acceptor_keys() == [6]
        assert store.read_promise_floor() == ZERO
        store.write_promise_floor(Ballot(7, 2, 3))
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        assert store.read_promise_floor() == Ballot(7, 2, 3)


def test_a_store_from_before_record_times_gains_them_and_keeps_its_rows(tmp_path):
    import sqlite3

    writer = Identity.from_seed(bytes(range(32)))
    key, item = sign_record(writer, b"n", b"v", 1)
    state = AcceptorState(5, Ballot(1, 1, 1))
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        store.write_record(key, item, 3, since=100.0)
        store.write_acceptor(state, since=200.0)
    db = sqlite3.connect(tmp_path / "persistence" / "store.sqlite3")
    for table in ("records", "acceptors"):
        db.executescript(f"""
            CREATE TABLE old AS SELECT key, data FROM {table};
            DROP TABLE {table};
            ALTER TABLE old RENAME TO {table};
        """)
    db.close()
    with SQLiteStore(tmp_path, capacity_bytes=0) as store:
        assert store.read_record(key) == (item, 3) and store.record_times() == {key: 0.0}
        assert store.read_acceptor(5) == state and store.acceptor_times() == {5: 0.0}
