"""A node's own uptime history: its sessions, and the share of a recent window it was up.

The deployer sizes a service's replica count from the availability of the nodes that would
host it; each node measures its own and advertises it in its description. A *session* is one
run of the node, from its start to its last sign of life. The driver calls :meth:`UptimeHistory.begin`
when the node starts and :meth:`UptimeHistory.record_heartbeat` every minute or so, and stores
:meth:`UptimeHistory.to_dict` in the data directory after each call. A node that crashes
cannot close its session, so the next :meth:`begin` closes it at its last heartbeat: a crash
costs at most one heartbeat interval of counted uptime, and the time the node was down counts
as down.

Times are wall-clock seconds (the history outlives the process, whose monotonic clock restarts),
passed in by the driver: this module reads no clock and does no I/O. Wall time may step back
(an NTP correction): a time earlier than what the history already holds is taken as that
latest time, so sessions never overlap and never run backwards.

The history is bounded: beyond ``max_sessions`` closed sessions the two oldest are merged into
one span that remembers how long the node was up within it, so availability stays honest (a
merged span's uptime is spread evenly over it when the window cuts it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Closed sessions kept before the oldest are merged.
MAX_SESSIONS = 1000
#: The default window of :meth:`UptimeHistory.availability`: the last 30 days.
AVAILABILITY_WINDOW_S = 30 * 86400.0
#: Less history than this and availability is unknown (None).
MIN_HISTORY_S = 60.0
#: The version of :meth:`UptimeHistory.to_dict`'s form.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Session:
    """A closed span of the node's life: from ``start_s`` to ``end_s`` (wall-clock seconds), up
    ``up_s`` of it (the whole span for one session; less for a span merged from several)."""

    start_s: float
    end_s: float
    up_s: float

    def __post_init__(self) -> None:
        for name in ("start_s", "end_s", "up_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"session {name} must be a finite number (got {value!r})")
        if self.end_s < self.start_s:
            raise ValueError(f"session end_s must be >= start_s (got {self.end_s!r} < {self.start_s!r})")
        if not 0 <= self.up_s <= self.end_s - self.start_s:
            raise ValueError(f"session up_s must be in [0, end_s - start_s] (got {self.up_s!r} "
                             f"for {self.end_s - self.start_s!r} s)")

    def up_within(self, lo_s: float, hi_s: float) -> float:
        """Seconds up within ``[lo_s, hi_s]`` (a merged span's uptime spread evenly over it)."""
        overlap = min(self.end_s, hi_s) - max(self.start_s, lo_s)
        if overlap <= 0:
            return 0.0
        span = self.end_s - self.start_s
        return self.up_s if overlap >= span else self.up_s * overlap / span


class UptimeHistory:
    """The node's closed sessions (oldest first, at most ``max_sessions``) and its current one."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS) -> None:
        if max_sessions < 1:
            raise ValueError(f"UptimeHistory.max_sessions must be >= 1 (got {max_sessions})")
        self.max_sessions = max_sessions
        self._sessions: list[Session] = []
        #: When the current session began, and its latest heartbeat (None: no session open).
        self._current_start_s: float | None = None
        self._last_heartbeat_s: float | None = None

    # -- inputs ----------------------------------------------------------------------------
    def begin(self, now_s: float) -> None:
        """The node started: a session opened at ``now_s``. A session still open (the node
        crashed, or stopped without a last heartbeat) is closed at its last heartbeat."""
        _check_time("now_s", now_s)
        self._close()
        latest = self.latest_s()
        if latest is not None:
            now_s = max(now_s, latest)
        self._current_start_s = self._last_heartbeat_s = now_s

    def record_heartbeat(self, now_s: float) -> None:
        """The node is up at ``now_s``: the current session lasts at least until then (one is
        opened at ``now_s`` when none is)."""
        _check_time("now_s", now_s)
        if self._current_start_s is None or self._last_heartbeat_s is None:
            self.begin(now_s)
            return
        self._last_heartbeat_s = max(self._last_heartbeat_s, now_s)

    def end(self, now_s: float) -> None:
        """The node stops cleanly at ``now_s``: its session is closed there (no session open:
        nothing to close)."""
        _check_time("now_s", now_s)
        if self._current_start_s is None:
            return
        self.record_heartbeat(now_s)
        self._close()

    # -- views -----------------------------------------------------------------------------
    @property
    def sessions(self) -> tuple[Session, ...]:
        """The closed sessions, oldest first."""
        return tuple(self._sessions)

    @property
    def current_start_s(self) -> float | None:
        return self._current_start_s

    @property
    def last_heartbeat_s(self) -> float | None:
        return self._last_heartbeat_s

    def first_start_s(self) -> float | None:
        """The earliest start this history knows of (None when it is empty)."""
        if self._sessions:
            return self._sessions[0].start_s
        return self._current_start_s

    def latest_s(self) -> float | None:
        """The latest time this history holds (a heartbeat, or the end of the last session)."""
        if self._last_heartbeat_s is not None:
            return self._last_heartbeat_s
        return self._sessions[-1].end_s if self._sessions else None

    def availability(self, now_s: float, window_s: float = AVAILABILITY_WINDOW_S,
                     *, min_history_s: float = MIN_HISTORY_S) -> float | None:
        """The share of the last ``window_s`` seconds before ``now_s`` (or of the time since the
        first recorded start, when shorter) the node was up, in ``[0, 1]``; None with less than
        ``min_history_s`` of history. The current session counts as up until ``now_s``: the
        node asking is running."""
        _check_time("now_s", now_s)
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 (got {window_s!r})")
        first = self.first_start_s()
        if first is None:
            return None
        hi = now_s
        lo = max(first, hi - window_s)
        if hi - lo < min_history_s:
            return None
        up = sum(session.up_within(lo, hi) for session in self._sessions)
        if self._current_start_s is not None:
            up += max(0.0, hi - max(self._current_start_s, lo))
        return min(1.0, max(0.0, up / (hi - lo)))

    # -- the stored form -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (numbers and lists only) for the driver to store; :meth:`from_dict` reads it."""
        return {
            "version": FORMAT_VERSION,
            "sessions": [[s.start_s, s.end_s, s.up_s] for s in self._sessions],
            "current_start_s": self._current_start_s,
            "last_heartbeat_s": self._last_heartbeat_s,
        }

    @classmethod
    def from_dict(cls, data: Any, *, max_sessions: int = MAX_SESSIONS) -> UptimeHistory:
        """The history :meth:`to_dict` wrote; ``ValueError`` naming the field when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"uptime history must be a mapping (got {type(data).__name__})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"uptime history: version must be {FORMAT_VERSION} (got {data.get('version')!r})")
        rows = data.get("sessions")
        if not isinstance(rows, list):
            raise ValueError("uptime history: sessions must be a list")
        history = cls(max_sessions=max_sessions)
        for index, row in enumerate(rows):
            if not isinstance(row, (list, tuple)) or len(row) != 3:
                raise ValueError(f"uptime history: sessions[{index}] must be [start_s, end_s, up_s] (got {row!r})")
            try:
                session = Session(*row)
            except ValueError as exc:
                raise ValueError(f"uptime history: sessions[{index}]: {exc}") from None
            if history._sessions and session.start_s < history._sessions[-1].end_s:
                raise ValueError(f"uptime history: sessions[{index}] starts before sessions[{index - 1}] ends")
            history._sessions.append(session)
        start, heartbeat = data.get("current_start_s"), data.get("last_heartbeat_s")
        if (start is None) != (heartbeat is None):
            raise ValueError("uptime history: current_start_s and last_heartbeat_s must both be set or both null")
        if start is not None:
            _check_time("uptime history: current_start_s", start)
            _check_time("uptime history: last_heartbeat_s", heartbeat)
            if heartbeat < start:
                raise ValueError("uptime history: last_heartbeat_s must be >= current_start_s "
                                 f"(got {heartbeat!r} < {start!r})")
            if history._sessions and start < history._sessions[-1].end_s:
                raise ValueError("uptime history: current_start_s is before the last session's end")
            history._current_start_s, history._last_heartbeat_s = float(start), float(heartbeat)
        history._bound()
        return history

    # -- internals -------------------------------------------------------------------------
    def _close(self) -> None:
        if self._current_start_s is not None and self._last_heartbeat_s is not None:
            span = self._last_heartbeat_s - self._current_start_s
            self._sessions.append(Session(self._current_start_s, self._last_heartbeat_s, span))
            self._bound()
        self._current_start_s = self._last_heartbeat_s = None

    def _bound(self) -> None:
        while len(self._sessions) > self.max_sessions:
            first, second = self._sessions[0], self._sessions[1]
            span = second.end_s - first.start_s
            self._sessions[0:2] = [Session(first.start_s, second.end_s, min(span, first.up_s + second.up_s))]


def _check_time(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds (got {value!r})")
