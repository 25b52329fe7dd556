"""Blob operations of replicated persistence: placing and fetching copies.

Each operation is multi-step work of the :class:`~p2pdeploy.collective.persistence.Persistence`
layer, driven by its holder search (:mod:`~p2pdeploy.collective.persistence_search`):
:class:`Place` puts one chunk or eventual record on the r closest nodes that lack it;
:class:`Fetch` gets one chunk (this node's copy if it verifies, else from the holders the search
meets); :class:`PutBlob` and :class:`GetBlob` run them for every chunk of a blob, a window at a
time; :class:`GetRecord` reads the newest copy of an eventual record and repairs stale ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.blobs import (
    BlobError,
    Chunked,
    Manifest,
    assemble,
    chunk_key,
    key_of_digest,
    parse_manifest,
    sha256,
)
from p2pdeploy.collective.persistence_messages import (
    KIND_CHUNK,
    KIND_RECORD,
    PURPOSE_PUBLISH,
    PURPOSE_REPAIR,
    ChunkBody,
    FetchChunk,
    Holders,
    Pin,
    StoreChunk,
    Stored,
    StorePin,
    StoreRecord,
)
from p2pdeploy.collective.persistence_search import Op, Rpc
from p2pdeploy.collective.persistence_store import ChunkInfo
from p2pdeploy.collective.records import check_record
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, newer

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import Persistence


class Place(Op):
    """Store one chunk or eventual record on the r closest nodes (those that lack it; those that
    hold a chunk get its ``pin``, which may be newer than theirs)."""

    def __init__(self, op_id: int, key: int, kind: int, replicas: int, purpose: int, *, data: bytes = b"",
                 item: Item | None = None, pin: Pin | None = None, parent: int | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.kind = kind
        self.replicas = replicas
        self.purpose = purpose
        self.data = data
        self.item = item
        self.holding = 0
        self.waiting = 0
        self.spares: list[Contact] = []
        self.refusals: list[str] = []
        self.pin = pin

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        ranked = p._rank_with_self(search.ranked(), self.key)
        targets, self.spares = ranked[: self.replicas], ranked[self.replicas :]
        for contact in targets:
            self._place(p, contact, search.replies.get(contact.node_id), now)
        self._maybe_finish(p, now)

    def _place(self, p: Persistence, contact: Contact, reply: Holders | None, now: float) -> None:
        if contact.node_id == p.node_id:
            reason = p._store_locally(self.key, self.kind, self.replicas, data=self.data, item=self.item,
                                      pin=self.pin, now=now)
            if reason is None:
                self.holding += 1
            else:
                self.refusals.append(reason)
                self._next_spare(p, now)
            return
        if reply is not None and reply.has and (self.kind == KIND_CHUNK or (
                self.item is not None and reply.item is not None and not newer(self.item, reply.item))):
            self.holding += 1
            if self.kind == KIND_CHUNK and self.pin is not None:  # refresh its pin (answer not awaited)
                p._request(contact, StorePin(0, p.node_id, self.key, self.pin), None, now)
            return
        self.waiting += 1
        if self.kind == KIND_CHUNK:
            msg: Any = StoreChunk(0, p.node_id, self.key, self.data, self.replicas, self.purpose, self.pin)
        else:
            assert self.item is not None
            msg = StoreRecord(0, p.node_id, self.key, self.item, self.replicas, self.purpose)
        p._request(contact, msg, self, now)

    def _next_spare(self, p: Persistence, now: float) -> None:
        if self.spares:
            self._place(p, self.spares.pop(0), None, now)

    def on_reply(self, p: Persistence, rpc: Rpc, msg: Any, now: float) -> None:
        if not isinstance(msg, Stored):
            return
        self.waiting -= 1
        if msg.ok:
            self.holding += 1
        else:
            self.refusals.append(msg.reason)
            self._next_spare(p, now)
        self._maybe_finish(p, now)

    def on_timeout(self, p: Persistence, rpc: Rpc, now: float) -> None:
        if rpc.kind in (StoreChunk, StoreRecord):
            self.waiting -= 1
            self.refusals.append("timeout")
            self._next_spare(p, now)
            self._maybe_finish(p, now)

    def _maybe_finish(self, p: Persistence, now: float) -> None:
        if self.waiting == 0 and self.search is not None and self.search.finished:
            p._finish(self, now)


class Fetch(Op):
    """Fetch one chunk: this node's copy if it verifies, else from holders the search meets."""

    def __init__(self, op_id: int, key: int, digest: bytes | None, parent: int | None = None,
                 *, restore: ChunkInfo | None = None) -> None:
        super().__init__(op_id, key, parent)
        self.digest = digest
        self.restore = restore  # a corrupt local copy being replaced: store the result like it
        self.holders: list[Contact] = []
        self.tried: set[int] = set()
        self.fetching: Contact | None = None
        self.data: bytes | None = None
        self.searches = 1
        #: Copies holders sent that failed their hash check here.
        self.corrupt = 0
        #: Holders that said they held the chunk but had no intact copy to send (a store drops a
        #: copy that fails its hash check when it reads it).
        self.lost = 0

    def verify(self, data: bytes) -> bool:
        if self.digest is not None:
            return sha256(data) == self.digest
        return chunk_key(data) == self.key

    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        if msg.has and contact.node_id not in self.tried:
            self.holders.append(contact)
            self._next(p, now)

    def _next(self, p: Persistence, now: float) -> None:
        if self.fetching is not None or self.done:
            return
        untried = [c for c in self.holders if c.node_id not in self.tried]
        if untried:
            untried.sort(key=lambda c: c.node_id ^ self.key)
            self.fetching = untried[0]
            self.tried.add(untried[0].node_id)
            p._request(untried[0], FetchChunk(0, p.node_id, self.key), self, now)
        elif self.search is not None and self.search.finished:
            if self.searches < p.config.fetch_searches:  # answers lost or late: search once more
                self.searches += 1
                self.holders.clear()
                self.tried.clear()
                p._search(self, KIND_CHUNK, False, p.config.replicas, now)
            else:
                p._finish(self, now)

    def on_search_done(self, p: Persistence, now: float) -> None:
        self._next(p, now)

    def on_reply(self, p: Persistence, rpc: Rpc, msg: Any, now: float) -> None:
        if not isinstance(msg, ChunkBody):
            return
        self.fetching = None
        if msg.found and msg.key == self.key and self.verify(msg.data):
            self.data = msg.data
            p._finish(self, now)
            return
        if msg.found:
            p.dropped["bad_chunk"] += 1
            self.corrupt += 1
        else:
            self.lost += 1
        self._next(p, now)

    def on_timeout(self, p: Persistence, rpc: Rpc, now: float) -> None:
        if rpc.kind is FetchChunk:
            self.fetching = None
            self._next(p, now)


class PutBlob(Op):
    def __init__(self, op_id: int, chunked: Chunked, replicas: int, keep: bool, pins: dict[int, Pin]) -> None:
        super().__init__(op_id, chunked.blob_id)
        self.chunked = chunked
        self.replicas = replicas
        self.keep = keep
        self.pins = pins
        unique = dict(chunked.chunks)
        unique[chunked.blob_id] = chunked.manifest_bytes
        self.queue = list(unique.items())
        self.running = 0
        self.fewest = replicas + 1
        self.failures: list[str] = []

    def start(self, p: Persistence, now: float) -> None:
        if self.keep:
            for key, data in self.queue:
                p.store.write_chunk(key, data, self.replicas, pinned=True, pin=self.pins.get(key), owner=p.node_id,
                                    since=p.wall(now))
                pin = self.pins.get(key)
                if pin is not None:  # a copy kept already gets the new pin
                    p.admit_chunk(key, data, self.replicas, pin, p.node_id, now)
        self._launch(p, now)

    def _launch(self, p: Persistence, now: float) -> None:
        while self.queue and self.running < p.config.window:
            key, data = self.queue.pop(0)
            self.running += 1
            child = Place(p._next_id(), key, KIND_CHUNK, self.replicas, PURPOSE_PUBLISH, data=data,
                          pin=self.pins.get(key), parent=self.op_id)
            p._start(child, now)
        if not self.queue and self.running == 0:
            p._finish(self, now)

    def on_child(self, p: Persistence, child: Op, now: float) -> None:
        assert isinstance(child, Place)
        self.running -= 1
        self.fewest = min(self.fewest, child.holding)
        if child.holding == 0:
            self.failures.append(f"chunk {child.key:040x}: {', '.join(child.refusals) or 'no node reached'}")
        self._launch(p, now)


class GetBlob(Op):
    def __init__(self, op_id: int, blob_id: int, keep: bool) -> None:
        super().__init__(op_id, blob_id)
        self.keep = keep
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""
        self.pieces: dict[int, bytes] = {}  # key -> data
        self.queue: list[tuple[int, bytes]] = []
        self.running = 0
        self.data: bytes | None = None
        self.reason = ""

    def start(self, p: Persistence, now: float) -> None:
        p._start(Fetch(p._next_id(), self.key, None, parent=self.op_id), now)

    def on_child(self, p: Persistence, child: Op, now: float) -> None:
        assert isinstance(child, Fetch)
        if self.done:
            return
        if child.data is None:
            what = "manifest" if self.manifest is None else f"chunk {child.key:040x}"
            self.reason = f"{what} not found"
            if child.corrupt:
                copies = "copy" if child.corrupt == 1 else "copies"
                self.reason += f": hash mismatch ({child.corrupt} {copies} received failed the hash check)"
            elif child.lost:
                nodes = "node" if child.lost == 1 else "nodes"
                self.reason += f" ({child.lost} {nodes} said they held it but had no intact copy)"
            p._finish(self, now)
            return
        if self.manifest is None:
            try:
                self.manifest = parse_manifest(self.key, child.data)
            except BlobError as exc:
                self.reason = str(exc)
                p._finish(self, now)
                return
            self.manifest_bytes = child.data
            wanted = {key_of_digest(d): d for d in self.manifest.chunks}
            self.queue = list(wanted.items())
        else:
            self.running -= 1
            self.pieces[child.key] = child.data
        self._launch(p, now)

    def _launch(self, p: Persistence, now: float) -> None:
        while self.queue and self.running < p.config.window:
            key, digest = self.queue.pop(0)
            self.running += 1
            p._start(Fetch(p._next_id(), key, digest, parent=self.op_id), now)
            if self.done:
                return
        if not self.queue and self.running == 0:
            manifest = self.manifest
            assert manifest is not None
            try:
                self.data = assemble(manifest, [self.pieces[key_of_digest(d)] for d in manifest.chunks])
            except BlobError as exc:
                self.reason = str(exc)
            else:
                if self.keep:
                    replicas, wall = p.capped(manifest.replicas), p.wall(now)
                    p.store.write_chunk(self.key, self.manifest_bytes, replicas, pinned=True, owner=p.node_id,
                                        since=wall)
                    for key, data in self.pieces.items():
                        p.store.write_chunk(key, data, replicas, pinned=True, owner=p.node_id, since=wall)
            p._finish(self, now)


class GetRecord(Op):
    def __init__(self, op_id: int, key: int, replicas: int) -> None:
        super().__init__(op_id, key)
        self.replicas = replicas
        self.best: Item | None = None

    def on_holder(self, p: Persistence, contact: Contact, msg: Holders, now: float) -> None:
        item = msg.item
        if item is None:
            return
        if check_record(self.key, item, p.config.max_record_bytes) is not None:
            p.dropped["bad_record"] += 1
            return
        if self.best is None or newer(item, self.best):
            self.best = item

    def on_search_done(self, p: Persistence, now: float) -> None:
        search = self.search
        assert search is not None
        best = self.best
        if best is not None:  # read repair: the r closest that answered with an older copy get the newest
            for contact in p._rank_with_self(search.ranked(), self.key)[: self.replicas]:
                if contact.node_id == p.node_id:
                    p._store_locally(self.key, KIND_RECORD, self.replicas, item=best, now=now)
                    continue
                reply = search.replies.get(contact.node_id)
                if reply is not None and (reply.item is None or newer(best, reply.item)):
                    p.counters["read_repairs"] += 1
                    p._request(contact, StoreRecord(0, p.node_id, self.key, best, self.replicas,
                                                    PURPOSE_REPAIR), None, now)
        p._finish(self, now)
