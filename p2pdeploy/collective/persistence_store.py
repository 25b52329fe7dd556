"""The durable local store of replicated persistence: chunks, records and acceptor state.

:class:`DurableStore` is the interface the :class:`~p2pdeploy.collective.persistence.Persistence`
layer keeps its copies in; it outlives a crash of the core. :class:`MemoryStore` is the one in
memory (the simulator, which keeps it across a crash as a disk, and unit tests);
``p2pdeploy.runtime.store_sqlite.SQLiteStore`` is the one on a real node's disk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol as TypingProtocol

from p2pdeploy.collective.blobs import chunk_key
from p2pdeploy.collective.persistence_messages import Pin
from p2pdeploy.collective.records import ZERO, AcceptorState, Ballot
from p2pdeploy.overlay.storage import Item


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    key: int
    size: int
    replicas: int
    #: Kept by this node's own choice (``keep=True``): never dropped as surplus or collected.
    pinned: bool = False
    #: The newest pin by a trusted key this node received for the chunk, if any.
    pin: Pin | None = None
    #: The node that stored the copy (whose quota an unpinned copy counts against).
    owner: int = 0
    #: When the copy was stored (wall-clock seconds): an unpinned copy is collected a grace
    #: period after it.
    since: float = 0.0


class DurableStore(TypingProtocol):
    """Where a node keeps chunks, records and acceptor state; it outlives a crash of the core.

    Reads of chunks are verified: a copy that no longer hashes to its key is removed, counted
    and listed by :meth:`take_corrupted`, and the read returns ``None``. Writes return a refusal
    reason (``"store is full"``) or ``None``; the quota is ``capacity_bytes``. Writing a chunk
    the store holds keeps its bytes, pin, owner and time, raising only its replicas and
    ``pinned``; :meth:`set_pin` replaces its pin.

    Records and acceptor states keep when they were last written here (wall-clock seconds, the
    ``since`` of the writes; 0 for those written before the store kept times), for the layer's
    collection of records by writers it does not trust and of promises no value followed.
    Writing a record with ``since=None`` keeps the time of the version held (raising its replicas
    only). The *promise floor* is the ballot an acceptor promises every key it holds no state for
    (``ZERO`` until it forgets a promise; it only rises).
    """

    capacity_bytes: int

    def chunk_infos(self) -> list[ChunkInfo]: ...
    def chunk_info(self, key: int) -> ChunkInfo | None: ...
    def read_chunk(self, key: int) -> bytes | None: ...
    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False, *, pin: Pin | None = None,
                    owner: int = 0, since: float = 0.0) -> str | None: ...
    def update_chunk(self, key: int, replicas: int, pinned: bool) -> None: ...
    def set_pin(self, key: int, pin: Pin | None) -> None: ...
    def delete_chunk(self, key: int) -> None: ...
    def verify_chunk(self, key: int) -> bool: ...
    def take_corrupted(self) -> list[ChunkInfo]: ...
    def used_bytes(self) -> int: ...
    def record_keys(self) -> list[int]: ...
    def read_record(self, key: int) -> tuple[Item, int] | None: ...
    def record_times(self) -> dict[int, float]: ...
    def write_record(self, key: int, item: Item, replicas: int, since: float | None = None) -> str | None: ...
    def delete_record(self, key: int) -> None: ...
    def acceptor_keys(self) -> list[int]: ...
    def acceptor_times(self) -> dict[int, float]: ...
    def read_acceptor(self, key: int) -> AcceptorState | None: ...
    def write_acceptor(self, state: AcceptorState, since: float = 0.0) -> None: ...
    def delete_acceptor(self, key: int) -> None: ...
    def read_promise_floor(self) -> Ballot: ...
    def write_promise_floor(self, ballot: Ballot) -> None: ...
    def close(self) -> None: ...


class ChunkBookkeeping:
    """What every store keeps the same way: bytes used, and chunks found corrupted since asked."""

    _corrupted: list[ChunkInfo]
    _used: int

    def read_chunk(self, key: int) -> bytes | None:
        raise NotImplementedError

    def verify_chunk(self, key: int) -> bool:
        return self.read_chunk(key) is not None

    def take_corrupted(self) -> list[ChunkInfo]:
        out, self._corrupted = self._corrupted, []
        return out

    def used_bytes(self) -> int:
        return self._used


class MemoryStore(ChunkBookkeeping):
    """The in-memory :class:`DurableStore` (simulator, unit tests): the same rules, no disk.

    Chunk bytes are kept by reference, so replicas of one chunk in a simulation share memory.
    """

    def __init__(self, capacity_bytes: int = 1 << 40) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 (got {capacity_bytes})")
        self.capacity_bytes = capacity_bytes
        self._chunks: dict[int, tuple[bytes, ChunkInfo]] = {}
        self._records: dict[int, tuple[Item, int]] = {}
        self._record_times: dict[int, float] = {}
        self._acceptors: dict[int, AcceptorState] = {}
        self._acceptor_times: dict[int, float] = {}
        self._promise_floor = ZERO
        self._corrupted: list[ChunkInfo] = []
        self._used = 0
        self.corruptions = 0

    # chunks
    def chunk_infos(self) -> list[ChunkInfo]:
        return [info for _, info in self._chunks.values()]

    def chunk_info(self, key: int) -> ChunkInfo | None:
        entry = self._chunks.get(key)
        return entry[1] if entry else None

    def read_chunk(self, key: int) -> bytes | None:
        entry = self._chunks.get(key)
        if entry is None:
            return None
        if chunk_key(entry[0]) != key:
            self._corrupt(key)
            return None
        return entry[0]

    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False, *, pin: Pin | None = None,
                    owner: int = 0, since: float = 0.0) -> str | None:
        current = self._chunks.get(key)
        if current is not None:
            info = current[1]
            self._chunks[key] = (current[0], replace(info, replicas=max(info.replicas, replicas),
                                                     pinned=info.pinned or pinned))
            return None
        if self._used + len(data) > self.capacity_bytes:
            return "store is full"
        self._chunks[key] = (data, ChunkInfo(key, len(data), replicas, pinned, pin, owner, since))
        self._used += len(data)
        return None

    def update_chunk(self, key: int, replicas: int, pinned: bool) -> None:
        entry = self._chunks.get(key)
        if entry is not None:
            self._chunks[key] = (entry[0], replace(entry[1], replicas=replicas, pinned=pinned))

    def set_pin(self, key: int, pin: Pin | None) -> None:
        entry = self._chunks.get(key)
        if entry is not None:
            self._chunks[key] = (entry[0], replace(entry[1], pin=pin))

    def delete_chunk(self, key: int) -> None:
        entry = self._chunks.pop(key, None)
        if entry is not None:
            self._used -= entry[1].size

    def corrupt(self, key: int) -> None:
        """Flip the bytes of a stored chunk (what a bad disk does), for tests."""
        data, info = self._chunks[key]
        self._chunks[key] = (bytes(b ^ 0xFF for b in data[:16]) + data[16:], info)

    def _corrupt(self, key: int) -> None:
        info = self._chunks[key][1]
        self.delete_chunk(key)
        self._corrupted.append(info)
        self.corruptions += 1

    # records
    def record_keys(self) -> list[int]:
        return list(self._records)

    def read_record(self, key: int) -> tuple[Item, int] | None:
        return self._records.get(key)

    def record_times(self) -> dict[int, float]:
        return dict(self._record_times)

    def write_record(self, key: int, item: Item, replicas: int, since: float | None = None) -> str | None:
        self._records[key] = (item, replicas)
        self._record_times[key] = self._record_times.get(key, 0.0) if since is None else since
        return None

    def delete_record(self, key: int) -> None:
        self._records.pop(key, None)
        self._record_times.pop(key, None)

    def acceptor_keys(self) -> list[int]:
        return list(self._acceptors)

    def acceptor_times(self) -> dict[int, float]:
        return dict(self._acceptor_times)

    def read_acceptor(self, key: int) -> AcceptorState | None:
        return self._acceptors.get(key)

    def write_acceptor(self, state: AcceptorState, since: float = 0.0) -> None:
        self._acceptors[state.key] = state
        self._acceptor_times[state.key] = since

    def delete_acceptor(self, key: int) -> None:
        self._acceptors.pop(key, None)
        self._acceptor_times.pop(key, None)

    def read_promise_floor(self) -> Ballot:
        return self._promise_floor

    def write_promise_floor(self, ballot: Ballot) -> None:
        self._promise_floor = ballot

    def close(self) -> None:
        pass
