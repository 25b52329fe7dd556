"""The node's uptime history on disk: ``<data_dir>/uptime.sqlite3`` (mode 0600).

:class:`UptimeStore` keeps one :class:`~p2pdeploy.fabric.uptime.UptimeHistory` in a one-row
table, as the JSON of its :meth:`~p2pdeploy.fabric.uptime.UptimeHistory.to_dict` form (at most
1,000 sessions: tens of kilobytes), replaced in one statement at every save, so a crash leaves
the previous save or the new one, never half of either. The node saves after it begins a
session and after every heartbeat; ``synchronous=NORMAL`` is enough, since what matters is
surviving the process dying, and a power loss costs at most the last heartbeat or two.

A history that cannot be read (a corrupt row, a file from a future version) is logged and
replaced by an empty one: the node then measures its availability afresh, which is better
than refusing to start over a statistic.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

from p2pdeploy.fabric.uptime import UptimeHistory
from p2pdeploy.runtime.store_sqlite import open_database

log = logging.getLogger(__name__)

UPTIME_DATABASE_FILE = "uptime.sqlite3"

_SCHEMA = "CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY CHECK (id = 0), data TEXT NOT NULL)"


class UptimeStore:
    """The uptime history kept in ``<data_dir>/uptime.sqlite3`` (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / UPTIME_DATABASE_FILE
        self._db: sqlite3.Connection | None = open_database(self.path, durable=False)
        try:
            self._db.execute(_SCHEMA)
        except BaseException:
            self.close()
            raise

    def load(self) -> UptimeHistory:
        """The history last saved, or an empty one (first start, or an unreadable row, logged)."""
        row = self._connection().execute("SELECT data FROM history WHERE id = 0").fetchone()
        if row is None:
            return UptimeHistory()
        try:
            return UptimeHistory.from_dict(json.loads(row[0]))
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            log.warning("ignored the uptime history in %s (%s); measuring availability afresh", self.path, exc)
            return UptimeHistory()

    def save(self, history: UptimeHistory) -> None:
        """Replace the stored history with ``history`` (one statement: all or nothing)."""
        data = json.dumps(history.to_dict(), separators=(",", ":"), allow_nan=False)
        self._connection().execute("INSERT OR REPLACE INTO history (id, data) VALUES (0, ?)", (data,))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"the uptime store {self.path} is closed")
        return self._db

    def __enter__(self) -> UptimeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
