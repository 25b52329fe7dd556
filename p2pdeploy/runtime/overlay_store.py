"""The overlay's durable store on a real node: what it holds and what it republishes, in SQLite.

:class:`SQLiteOverlayStore` is the :class:`~p2pdeploy.overlay.storage.LocalStore` of the
Kademlia layer with every change written through to ``<data_dir>/overlay.sqlite3`` (mode
0600), and loaded back when the node starts again::

    items      the values this node holds for others (and cache copies), with their expiry
    published  the values this node published itself, with their TTL and next republish

The core reads from memory, as with the in-memory store, and the file is the copy that
outlives the process; both hold the same items, so the caps (``max_items`` items weighing
``max_bytes`` together) bound the file too. An item whose write fails is refused, as a full
store refuses it.

Times: the core's clock restarts with the process, so the file keeps wall-clock (Unix) times,
``core time + wall_clock_offset_s`` of the process that wrote them, and a new process turns them
back with its own offset. An item that expired while the node was down is dropped when the
store opens and never served.

Writes are ``synchronous=NORMAL``: a value's other k-1 replicas cover the last writes before
a power loss, and a STORE from a peer must not cost an fsync. Items are columns, not CBOR: a
field added to :class:`~p2pdeploy.overlay.storage.Item` needs a column here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from p2pdeploy.overlay.storage import Item, LocalStore, OverlayStore, Publication, Stored, item_bytes
from p2pdeploy.runtime.store_sqlite import open_database
from p2pdeploy.wire import ID_BYTES

if TYPE_CHECKING:
    from p2pdeploy.overlay.kademlia import KademliaConfig

log = logging.getLogger(__name__)

OVERLAY_DATABASE_FILE = "overlay.sqlite3"

_ITEM_COLUMNS = "value, public_key, name, sequence, signature"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    key BLOB PRIMARY KEY, {_ITEM_COLUMNS},
    expires_at REAL NOT NULL, refreshed_at REAL NOT NULL, cached INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS published (
    key BLOB PRIMARY KEY, {_ITEM_COLUMNS},
    ttl_s REAL NOT NULL, republish_at REAL NOT NULL
);
"""


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(ID_BYTES, "big")


def _item_row(item: Item) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    # a sequence may reach 2**64 - 1, past SQLite's signed 64-bit integers
    return item.value, item.public_key, item.name, item.sequence.to_bytes(8, "big"), item.signature


def _item_of(row: tuple[object, ...]) -> Item | None:
    value, public_key, name, sequence, signature = row
    fields = (value, public_key, name, sequence, signature)
    if not all(isinstance(field, bytes) for field in fields) or len(sequence) != 8:  # type: ignore[arg-type]
        return None
    return Item(value, public_key, name, int.from_bytes(sequence, "big"), signature)  # type: ignore[arg-type]


class SQLiteOverlayStore(LocalStore):
    """The overlay's items and republish list in ``<data_dir>/overlay.sqlite3`` (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        wall_clock_offset_s: float,
        now: float,
        max_items: int,
        max_bytes: int,
    ) -> None:
        super().__init__(max_items, max_bytes)
        self.wall_clock_offset_s = wall_clock_offset_s
        #: Writes that failed (their items were refused; a failed delete is retried at the next open).
        self.write_errors = 0
        root = Path(data_dir)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = root / OVERLAY_DATABASE_FILE
        self.db: sqlite3.Connection | None = open_database(self.path, durable=False)
        try:
            self.db.executescript(_SCHEMA)
            self._load(now)
        except BaseException:
            self.close()
            raise

    def _wall(self, t: float) -> float:
        return t + self.wall_clock_offset_s

    def _core(self, wall: float) -> float:
        return wall - self.wall_clock_offset_s

    def _load(self, now: float) -> None:
        """Hold again what the file has: expired, unreadable and over-the-caps items are deleted."""
        assert self.db is not None
        drop = []
        rows = self.db.execute(
            f"SELECT key, {_ITEM_COLUMNS}, expires_at, refreshed_at, cached FROM items ORDER BY expires_at DESC"
        ).fetchall()
        for key, *fields, expires_at, refreshed_at, cached in rows:
            item = _item_of(tuple(fields))
            stored = None if item is None else Stored(item, self._core(expires_at), self._core(refreshed_at),
                                                      bool(cached))
            if (stored is None or stored.expires_at <= now or len(self._items) >= self.max_items
                    or self._bytes + item_bytes(stored.item) > self.max_bytes):
                drop.append(key)
                continue
            self._items[int.from_bytes(key, "big")] = stored
            self._bytes += item_bytes(stored.item)
        self._delete_rows("items", drop)
        unreadable = []
        for key, *fields, ttl_s, republish_at in self.db.execute(
            f"SELECT key, {_ITEM_COLUMNS}, ttl_s, republish_at FROM published"
        ).fetchall():
            item = _item_of(tuple(fields))
            if item is None:
                unreadable.append(key)
                continue
            self._publications[int.from_bytes(key, "big")] = Publication(item, ttl_s, self._core(republish_at))
        self._delete_rows("published", unreadable)

    def _delete_rows(self, table: str, keys: list[bytes]) -> None:
        assert self.db is not None
        if keys:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(f"DELETE FROM {table} WHERE key = ?", [(key,) for key in keys])

    # -- write-through ------------------------------------------------------------------------
    def _write_item(self, key: int, stored: Stored) -> str | None:
        error = self._run(
            f"INSERT OR REPLACE INTO items (key, {_ITEM_COLUMNS}, expires_at, refreshed_at, cached)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(_key_bytes(key), *_item_row(stored.item), self._wall(stored.expires_at),
              self._wall(stored.refreshed_at), int(stored.cached))],
        )
        return None if error is None else f"cannot write the store: {error}"

    def _delete_items(self, keys: list[int]) -> None:
        # rows a failed delete leaves behind are expired ones: dropped when the store opens next
        self._run("DELETE FROM items WHERE key = ?", [(_key_bytes(key),) for key in keys])

    def _write_publication(self, key: int, publication: Publication) -> None:
        # a failed write is logged; the value is still republished while this process runs
        self._run(
            f"INSERT OR REPLACE INTO published (key, {_ITEM_COLUMNS}, ttl_s, republish_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(_key_bytes(key), *_item_row(publication.item), publication.ttl_s,
              self._wall(publication.republish_at))],
        )

    def _delete_publication(self, key: int) -> None:
        self._run("DELETE FROM published WHERE key = ?", [(_key_bytes(key),)])

    def _run(self, sql: str, rows: list[tuple[object, ...]]) -> str | None:
        """Run ``sql`` once per row in one transaction; what went wrong (logged and counted) or None."""
        if not rows:
            return None
        try:
            if self.db is None:
                raise sqlite3.ProgrammingError("the store is closed")
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(sql, rows)
        except sqlite3.Error as exc:
            self.write_errors += 1
            log.warning("overlay store %s: %s", self.path, exc)
            return str(exc)
        return None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> SQLiteOverlayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_overlay_store(data_dir: Path | None, config: KademliaConfig, *, wall_clock_offset_s: float,
                       now: float) -> OverlayStore:
    """The Kademlia layer's store: SQLite in the node's data directory, or memory without one;
    with the caps of ``config``. The caller closes it."""
    if data_dir is None:
        return LocalStore(config.max_stored_items, config.max_stored_bytes)
    return SQLiteOverlayStore(
        data_dir,
        wall_clock_offset_s=wall_clock_offset_s,
        now=now,
        max_items=config.max_stored_items,
        max_bytes=config.max_stored_bytes,
    )
