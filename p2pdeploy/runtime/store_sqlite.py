"""The durable store of a real node: SQLite for the index and records, files named by hash for chunks.

:class:`SQLiteStore` implements :class:`p2pdeploy.collective.persistence.DurableStore` in the
node's data directory::

    <data_dir>/persistence/store.sqlite3     chunk index, eventual records, quorum acceptor state (WAL)
    <data_dir>/persistence/chunks/ab/<sha256 hex>   one file per chunk, named by its full digest

A chunk file is written to a temporary name, flushed, and renamed into place before its index
row is committed, so after a crash a chunk is either whole and indexed, or absent. Opening the
store reconciles the two: files no row names (and leftover temporary files) are removed, and rows
whose file is gone are dropped and reported by ``take_corrupted`` so the persistence layer fetches
them again. Every read re-hashes the file: a copy damaged on disk is dropped, reported, and
repaired from a replica by the layer.

A chunk's row also holds its pin (the publisher's key, the expiry and the signature), who
stored it and when (``owner``, ``since``), for the layer's quotas and its collection of
unpinned chunks; record and acceptor rows hold when they were last written (``since``), for the
collection of strangers' records and of promises no value followed; ``promise_floor`` holds
the one ballot the acceptor promises every key it has no row for. A store created before those
columns existed gains them when opened.

Records and acceptor states are stored as their CBOR wire form (``wire.py`` stays the only
place that knows CBOR). Acceptor state must be on disk before a promise leaves the node (Paxos
relies on it), hence ``synchronous=FULL`` when ``durable`` (the default).

The quota is ``capacity_bytes`` of chunk data; :func:`capacity_from` derives it from the
owner's disk contribution (``p2pdeploy.fabric.contribution``).

This module does I/O, which is why it lives in ``runtime/``; the core calls it through the
interface and never knows it is a disk.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from p2pdeploy import wire
from p2pdeploy.collective.persistence import ChunkBookkeeping, ChunkInfo, Pin
from p2pdeploy.collective.records import ZERO, AcceptorState, Ballot, StoredRecord
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.overlay.storage import Item
from p2pdeploy.wire import ID_BYTES, NodeId

STORE_DIR = "persistence"
DATABASE_FILE = "store.sqlite3"
CHUNKS_DIR = "chunks"
#: Share of the owner's disk contribution given to stored chunks by default.
DEFAULT_DISK_SHARE = 0.5
#: The quota of a node whose owner stated no contribution.
DEFAULT_CAPACITY_BYTES = int(Contribution().disk_bytes * DEFAULT_DISK_SHARE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    key BLOB PRIMARY KEY,
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    replicas INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    pin_key BLOB,
    pin_expires INTEGER,
    pin_signature BLOB,
    owner BLOB,
    since REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (key BLOB PRIMARY KEY, data BLOB NOT NULL, since REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS acceptors (key BLOB PRIMARY KEY, data BLOB NOT NULL, since REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS promise_floor (id INTEGER PRIMARY KEY CHECK (id = 0), data BLOB NOT NULL);
"""


#: Columns added to each table after its first release, with their declarations.
_ADDED_COLUMNS = {
    "chunks": {"pin_key": "BLOB", "pin_expires": "INTEGER", "pin_signature": "BLOB", "owner": "BLOB",
               "since": "REAL NOT NULL DEFAULT 0"},
    "records": {"since": "REAL NOT NULL DEFAULT 0"},
    "acceptors": {"since": "REAL NOT NULL DEFAULT 0"},
}
_CHUNK_COLUMNS = "key, size, replicas, pinned, pin_key, pin_expires, pin_signature, owner, since"


def open_database(path: Path, *, durable: bool) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` as every store of a node uses it: autocommit
    (each statement is its own transaction unless a store opens one), write-ahead log,
    ``synchronous=FULL`` when ``durable`` (a commit is on disk before the call returns) or
    ``NORMAL`` (it survives the process crashing, not the machine losing power). The file is
    created with mode 0600 (SQLite gives its log files the same mode) and made so if it was not.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    except BaseException:
        db.close()
        raise
    return db


def capacity_from(contribution: Contribution, share: float = DEFAULT_DISK_SHARE) -> int:
    """The chunk quota: ``share`` of the disk the owner contributes (the rest is for services)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1] (got {share})")
    return int(contribution.disk_bytes * share)


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(ID_BYTES, "big")


def _key_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _chunk_info(row: tuple[Any, ...]) -> ChunkInfo:
    """A ``chunks`` row (the columns of ``_CHUNK_COLUMNS``) as the layer sees it."""
    key, size, replicas, pinned, pin_key, pin_expires, pin_signature, owner, since = row
    key = _key_int(key)
    pin = None if pin_key is None else Pin(NodeId(key), pin_expires, pin_key, pin_signature)
    return ChunkInfo(key, size, replicas, bool(pinned), pin, _key_int(owner) if owner else 0, since)


def _pin_columns(pin: Pin | None) -> tuple[bytes | None, int | None, bytes | None]:
    return (None, None, None) if pin is None else (pin.public_key, pin.expires_at, pin.signature)


class SQLiteStore(ChunkBookkeeping):
    """A :class:`~p2pdeploy.collective.persistence.DurableStore` in ``<data_dir>/persistence``."""

    def __init__(self, data_dir: str | os.PathLike[str], *, capacity_bytes: int, durable: bool = True) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 (got {capacity_bytes})")
        self.capacity_bytes = capacity_bytes
        self.durable = durable
        self.root = Path(data_dir) / STORE_DIR
        self.chunks_dir = self.root / CHUNKS_DIR
        self.chunks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self.root, self.chunks_dir):  # services share the machine: the store is the node's
            directory.chmod(0o700)
        self.db = open_database(self.root / DATABASE_FILE, durable=durable)
        self.db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column, declaration in columns.items():
                if column not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        self._corrupted: list[ChunkInfo] = []
        #: Chunks whose bytes no longer matched their hash (dropped and reported).
        self.corruptions = 0
        self._used = 0
        self._reconcile()

    # -- files ------------------------------------------------------------------------------
    def path_of(self, digest: bytes) -> Path:
        """Where the chunk with this SHA-256 lives."""
        name = digest.hex()
        return self.chunks_dir / name[:2] / name

    def _write_file(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _reconcile(self) -> None:
        """Make the index and the files agree after a crash (see the module docstring)."""
        named = {}
        for digest, *row in self.db.execute(f"SELECT digest, {_CHUNK_COLUMNS} FROM chunks"):
            named[self.path_of(digest)] = _chunk_info(tuple(row))
        for sub in self.chunks_dir.iterdir():
            if not sub.is_dir():
                sub.unlink(missing_ok=True)
                continue
            for path in sub.iterdir():
                if path not in named:
                    path.unlink(missing_ok=True)  # a temporary file, or a chunk whose row never committed
        for path, info in named.items():
            if path.is_file():
                self._used += info.size
            else:
                self.db.execute("DELETE FROM chunks WHERE key = ?", (_key_bytes(info.key),))
                self._corrupted.append(info)
                self.corruptions += 1

    # -- chunks -----------------------------------------------------------------------------
    def chunk_infos(self) -> list[ChunkInfo]:
        return [_chunk_info(row) for row in self.db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks")]

    def chunk_info(self, key: int) -> ChunkInfo | None:
        row = self.db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE key = ?", (_key_bytes(key),)).fetchone()
        return None if row is None else _chunk_info(row)

    def read_chunk(self, key: int) -> bytes | None:
        row = self.db.execute(f"SELECT digest, {_CHUNK_COLUMNS} FROM chunks WHERE key = ?",
                              (_key_bytes(key),)).fetchone()
        if row is None:
            return None
        digest, *columns = row
        try:
            data = self.path_of(digest).read_bytes()
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).digest() != digest:
            self._drop_corrupt(_chunk_info(tuple(columns)), digest)
            return None
        return data

    def _drop_corrupt(self, info: ChunkInfo, digest: bytes) -> None:
        self.db.execute("DELETE FROM chunks WHERE key = ?", (_key_bytes(info.key),))
        self.path_of(digest).unlink(missing_ok=True)
        self._used -= info.size
        self._corrupted.append(info)
        self.corruptions += 1

    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False, *, pin: Pin | None = None,
                    owner: int = 0, since: float = 0.0) -> str | None:
        current = self.chunk_info(key)
        if current is not None:
            self.update_chunk(key, max(current.replicas, replicas), current.pinned or pinned)
            return None
        if self._used + len(data) > self.capacity_bytes:
            return "store is full"
        digest = hashlib.sha256(data).digest()
        self._write_file(self.path_of(digest), data)
        self.db.execute("INSERT INTO chunks (key, digest, size, replicas, pinned, pin_key, pin_expires, pin_signature,"
                        " owner, since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (_key_bytes(key), digest, len(data), replicas, int(pinned), *_pin_columns(pin),
                         _key_bytes(owner), since))
        self._used += len(data)
        return None

    def update_chunk(self, key: int, replicas: int, pinned: bool) -> None:
        self.db.execute("UPDATE chunks SET replicas = ?, pinned = ? WHERE key = ?",
                        (replicas, int(pinned), _key_bytes(key)))

    def set_pin(self, key: int, pin: Pin | None) -> None:
        self.db.execute("UPDATE chunks SET pin_key = ?, pin_expires = ?, pin_signature = ? WHERE key = ?",
                        (*_pin_columns(pin), _key_bytes(key)))

    def delete_chunk(self, key: int) -> None:
        row = self.db.execute("SELECT digest, size FROM chunks WHERE key = ?", (_key_bytes(key),)).fetchone()
        if row is None:
            return
        self.db.execute("DELETE FROM chunks WHERE key = ?", (_key_bytes(key),))
        self.path_of(row[0]).unlink(missing_ok=True)
        self._used -= row[1]

    # -- records and acceptor state ----------------------------------------------------------
    def record_keys(self) -> list[int]:
        return [_key_int(row[0]) for row in self.db.execute("SELECT key FROM records")]

    def read_record(self, key: int) -> tuple[Item, int] | None:
        row = self.db.execute("SELECT data FROM records WHERE key = ?", (_key_bytes(key),)).fetchone()
        if row is None:
            return None
        stored = wire.decode(row[0], limit_bytes=len(row[0]))
        if not isinstance(stored, StoredRecord) or stored.key != key:
            self.db.execute("DELETE FROM records WHERE key = ?", (_key_bytes(key),))
            return None
        return stored.item, stored.replicas

    def record_times(self) -> dict[int, float]:
        return {_key_int(key): since for key, since in self.db.execute("SELECT key, since FROM records")}

    def write_record(self, key: int, item: Item, replicas: int, since: float | None = None) -> str | None:
        data = wire.encode(StoredRecord(key, item, replicas))
        keep = "" if since is None else ", since = excluded.since"
        self.db.execute(f"INSERT INTO records (key, data, since) VALUES (?, ?, ?) "
                        f"ON CONFLICT(key) DO UPDATE SET data = excluded.data{keep}",
                        (_key_bytes(key), data, since or 0.0))
        return None

    def delete_record(self, key: int) -> None:
        self.db.execute("DELETE FROM records WHERE key = ?", (_key_bytes(key),))

    def acceptor_keys(self) -> list[int]:
        return [_key_int(row[0]) for row in self.db.execute("SELECT key FROM acceptors")]

    def acceptor_times(self) -> dict[int, float]:
        return {_key_int(key): since for key, since in self.db.execute("SELECT key, since FROM acceptors")}

    def read_acceptor(self, key: int) -> AcceptorState | None:
        row = self.db.execute("SELECT data FROM acceptors WHERE key = ?", (_key_bytes(key),)).fetchone()
        if row is None:
            return None
        state = wire.decode(row[0], limit_bytes=len(row[0]))
        return state if isinstance(state, AcceptorState) and state.key == key else None

    def write_acceptor(self, state: AcceptorState, since: float = 0.0) -> None:
        self.db.execute("INSERT OR REPLACE INTO acceptors (key, data, since) VALUES (?, ?, ?)",
                        (_key_bytes(state.key), wire.encode(state), since))

    def delete_acceptor(self, key: int) -> None:
        self.db.execute("DELETE FROM acceptors WHERE key = ?", (_key_bytes(key),))

    def read_promise_floor(self) -> Ballot:
        row = self.db.execute("SELECT data FROM promise_floor WHERE id = 0").fetchone()
        if row is None:
            return ZERO
        state = wire.decode(row[0], limit_bytes=len(row[0]))
        return state.promised if isinstance(state, AcceptorState) else ZERO

    def write_promise_floor(self, ballot: Ballot) -> None:
        """Kept as the promise of an acceptor state of key 0 (``wire.py`` stays the only codec)."""
        self.db.execute("INSERT OR REPLACE INTO promise_floor (id, data) VALUES (0, ?)",
                        (wire.encode(AcceptorState(0, ballot)),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
