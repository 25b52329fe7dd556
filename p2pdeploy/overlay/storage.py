"""Values held by the overlay: opaque bytes with a TTL, and signed mutable records.

An *item* is what STORE carries and FIND_VALUE returns. A plain item is opaque bytes; a
*signed record* also names its publisher's Ed25519 key, a sequence number and a signature, and
lives under ``record_key(public_key, name)``, so only the key's owner can write it. Among
valid records for a key the highest sequence wins (a stale replica can never roll a record
back). Signatures are checked when a record is stored and again when a reader receives it.

Expiry travels as a remaining TTL, so a replica that republishes passes on the time it was
given, never a fresh one: only the original publisher can extend a value's life.

The local store is an :class:`OverlayStore`: the items this node holds for others and the
values it published itself (its republish list). The core calls it synchronously, as the
persistence layer calls its ``DurableStore``; :class:`LocalStore` keeps everything in memory
(the default: the simulator, unit tests, a node without a data directory), and a real node
hands in ``p2pdeploy.runtime.overlay_store.SQLiteOverlayStore``, which writes every change
through to SQLite in its data directory so a restarted node serves what it held. Times given
to a store are the core's clock; a durable store keeps them in a form that survives the
process (and its clock) restarting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol as TypingProtocol

from p2pdeploy.overlay.identity import Identity, key_id, verify
from p2pdeploy.wire import ID_BYTES, record

RECORD_DOMAIN = b"p2pdeploy/record/v1"
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
DEFAULT_MAX_TTL_S = 7 * 24 * 3600.0
DEFAULT_MAX_STORED_ITEMS = 100_000
#: What all items held may weigh together (``item_bytes``): a full store of the largest values
#: would otherwise be ``max_items * max_value_bytes`` (over 6 GiB).
DEFAULT_MAX_STORED_BYTES = 256 * 1024 * 1024
FULL = "store is full"


@record
class Item:
    """A stored value. ``public_key`` empty means a plain value; otherwise a signed record."""

    value: bytes
    public_key: bytes = b""
    name: bytes = b""
    sequence: int = 0
    signature: bytes = b""

    @property
    def signed(self) -> bool:
        return bool(self.public_key)


def record_key(public_key: bytes, name: bytes) -> int:
    """The overlay key of the record ``name`` published by ``public_key``."""
    return key_id(public_key + b"/" + name)


def _signed_bytes(key: int, item: Item) -> bytes:
    return b"".join(
        (
            RECORD_DOMAIN,
            key.to_bytes(ID_BYTES, "big"),
            item.sequence.to_bytes(8, "big", signed=False),
            len(item.name).to_bytes(4, "big"),
            item.name,
            item.value,
        )
    )


def sign_record(identity: Identity, name: bytes, value: bytes, sequence: int, *,
                key: int | None = None) -> tuple[int, Item]:
    """Make a signed record; returns its overlay key and the item. The key is
    ``record_key(identity.public_key, name)`` unless ``key`` names another (a record whose key
    derives from its name alone, such as a service's state, which several writers share)."""
    if not 0 <= sequence < 1 << 64:
        raise ValueError(f"sequence must be in [0, 2**64) (got {sequence})")
    key = record_key(identity.public_key, name) if key is None else key
    unsigned = Item(value, identity.public_key, name, sequence, b"")
    signature = identity.sign(_signed_bytes(key, unsigned))
    return key, Item(value, identity.public_key, name, sequence, signature)


def check_item(key: int, item: Item, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> str | None:
    """Why ``item`` may not be stored under ``key`` (``None`` when it may)."""
    if len(item.value) > max_value_bytes:
        return f"value of {len(item.value)} bytes is over the limit of {max_value_bytes}"
    if not item.signed:
        if item.name or item.sequence or item.signature:
            return "a plain value carries no name, sequence or signature"
        return None
    if not 0 <= item.sequence < 1 << 64:
        return "sequence out of range"
    if record_key(item.public_key, item.name) != key:
        return "record key does not match its publisher key and name"
    if not signature_valid(key, item):
        return "bad signature"
    return None


def signature_valid(key: int, item: Item) -> bool:
    """True when ``item`` is signed by its ``public_key`` as the record under ``key`` (the key
    is signed too, so a record cannot be replayed under another key)."""
    return verify(item.public_key, item.signature, _signed_bytes(key, item))


def newness(item: Item) -> tuple[int, bytes]:
    """How new ``item`` is under its key: its sequence, then its signature, so every node picks
    the same one of two records signed with one sequence. The one rule for reads of signed
    records: the overlay's ``get(latest=True)`` and persistence's eventual records both keep the
    newest answer by it."""
    return item.sequence, item.signature


def newer(a: Item, b: Item) -> bool:
    """True when ``a`` wins over ``b`` under one key (see :func:`newness`)."""
    return newness(a) > newness(b)


def supersedes(new: Item, old: Item) -> str | None:
    """Why ``new`` may not replace ``old`` under the same key (``None`` when it may)."""
    if old.signed and not new.signed:
        return "a signed record cannot be overwritten by a plain value"
    if old.signed and new.signed:
        if new.sequence < old.sequence:
            return f"sequence {new.sequence} is older than the stored {old.sequence}"
        if new.sequence == old.sequence and new != old:
            return f"a different record with the same sequence {new.sequence} is already stored"
    return None


def item_bytes(item: Item) -> int:
    """What ``item`` weighs in a store's byte quota: its value, and a record's key, name and signature."""
    return len(item.value) + len(item.public_key) + len(item.name) + len(item.signature)


@dataclass(frozen=True, slots=True)
class Stored:
    item: Item
    expires_at: float
    #: When this node last received a STORE for the key (a replica that got one need not republish).
    refreshed_at: float
    cached: bool = False


@dataclass(frozen=True, slots=True)
class Publication:
    """A value this node published itself: it republishes it with a fresh ``ttl_s`` until told not to."""

    item: Item
    ttl_s: float
    #: When the next republish is due (the core's clock).
    republish_at: float


class OverlayStore(TypingProtocol):
    """Where the overlay keeps the items it holds and its republish list.

    ``put`` applies the overlay's rules (a signed record only moves forward, a cache copy never
    displaces a replica) and the caps: at most ``max_items`` items weighing at most ``max_bytes``
    together; it returns a refusal reason or ``None``. Reading an expired item removes it.
    """

    max_items: int
    max_bytes: int

    def put(self, key: int, item: Item, ttl_s: float, now: float, *, cached: bool = False) -> str | None: ...
    def get(self, key: int, now: float) -> Stored | None: ...
    def refreshed(self, key: int, now: float) -> None: ...
    def expire(self, now: float) -> int: ...
    def items(self) -> list[tuple[int, Stored]]: ...
    def used_bytes(self) -> int: ...
    def publications(self) -> dict[int, Publication]: ...
    def publish(self, key: int, publication: Publication) -> None: ...
    def unpublish(self, key: int) -> None: ...
    def close(self) -> None: ...
    def __contains__(self, key: int) -> bool: ...
    def __len__(self) -> int: ...


class LocalStore:
    """The in-memory :class:`OverlayStore`.

    A durable store extends it: every change goes through ``_write_item``, ``_delete_items``,
    ``_write_publication`` and ``_delete_publication``, which do nothing here. An item whose
    write fails is refused (``_write_item`` returns the reason), so memory never holds more
    than the disk; the republish list is the local caller's and always kept in memory.
    """

    def __init__(self, max_items: int = DEFAULT_MAX_STORED_ITEMS, max_bytes: int = DEFAULT_MAX_STORED_BYTES) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"max_items and max_bytes must be >= 1 (got {max_items}, {max_bytes})")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: dict[int, Stored] = {}
        self._bytes = 0
        self._publications: dict[int, Publication] = {}

    def put(self, key: int, item: Item, ttl_s: float, now: float, *, cached: bool = False) -> str | None:
        """Store ``item`` (already checked with ``check_item``); returns a refusal reason or ``None``."""
        current = self.get(key, now)
        if current is not None:
            reason = supersedes(item, current.item)
            if reason is not None:
                return reason
            if cached and not current.cached:
                return None  # a cache copy never displaces a replica
        elif len(self._items) >= self.max_items:
            return FULL
        if self._bytes - (item_bytes(current.item) if current else 0) + item_bytes(item) > self.max_bytes:
            return FULL
        expires_at = now + ttl_s
        if current is not None and current.item == item:
            expires_at = max(expires_at, current.expires_at)
        return self._set(key, Stored(item, expires_at, now, cached and (current is None or current.cached)))

    def get(self, key: int, now: float) -> Stored | None:
        stored = self._items.get(key)
        if stored is not None and stored.expires_at <= now:
            self._drop([key])
            return None
        return stored

    def refreshed(self, key: int, now: float) -> None:
        """Note that the item under ``key`` went out again at ``now`` (a replica's republish)."""
        stored = self._items.get(key)
        if stored is not None:
            self._set(key, replace(stored, refreshed_at=now))

    def expire(self, now: float) -> int:
        dead = [key for key, stored in self._items.items() if stored.expires_at <= now]
        self._drop(dead)
        return len(dead)

    def items(self) -> list[tuple[int, Stored]]:
        return list(self._items.items())

    def used_bytes(self) -> int:
        """What the items held weigh together (``item_bytes``)."""
        return self._bytes

    def _set(self, key: int, stored: Stored) -> str | None:
        reason = self._write_item(key, stored)
        if reason is not None:
            return reason
        old = self._items.get(key)
        self._bytes += item_bytes(stored.item) - (item_bytes(old.item) if old else 0)
        self._items[key] = stored
        return None

    def _drop(self, keys: list[int]) -> None:
        if not keys:
            return
        for key in keys:
            self._bytes -= item_bytes(self._items.pop(key).item)
        self._delete_items(keys)

    # -- the republish list ------------------------------------------------------------------
    def publications(self) -> dict[int, Publication]:
        return dict(self._publications)

    def publish(self, key: int, publication: Publication) -> None:
        self._publications[key] = publication
        self._write_publication(key, publication)

    def unpublish(self, key: int) -> None:
        if self._publications.pop(key, None) is not None:
            self._delete_publication(key)

    # -- what a durable store does besides (nothing here) -------------------------------------
    def _write_item(self, key: int, stored: Stored) -> str | None:
        return None

    def _delete_items(self, keys: list[int]) -> None:
        pass

    def _write_publication(self, key: int, publication: Publication) -> None:
        pass

    def _delete_publication(self, key: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
