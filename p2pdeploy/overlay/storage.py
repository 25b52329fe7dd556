"""Values held by the overlay: opaque bytes with a TTL, and signed mutable records.

An *item* is what STORE carries and FIND_VALUE returns. A plain item is opaque bytes; a
*signed record* also names its publisher's Ed25519 key, a sequence number and a signature, and
lives under ``record_key(public_key, name)``, so only the key's owner can write it. Among
valid records for a key the highest sequence wins (a stale replica can never roll a record
back). Signatures are checked when a record is stored and again when a reader receives it.

Expiry travels as a remaining TTL, so a replica that republishes passes on the time it was
given, never a fresh one: only the original publisher can extend a value's life.

This module is the local store (in memory); durable storage comes with the persistence layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdeploy.overlay.identity import Identity, key_id, verify
from p2pdeploy.wire import ID_BYTES, record

RECORD_DOMAIN = b"p2pdeploy/record/v1"
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
DEFAULT_MAX_TTL_S = 7 * 24 * 3600.0


@record
@dataclass(frozen=True, slots=True)
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


def sign_record(identity: Identity, name: bytes, value: bytes, sequence: int) -> tuple[int, Item]:
    """Make a signed record; returns its overlay key and the item."""
    if not 0 <= sequence < 1 << 64:
        raise ValueError(f"sequence must be in [0, 2**64) (got {sequence})")
    key = record_key(identity.public_key, name)
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
    if not verify(item.public_key, item.signature, _signed_bytes(key, item)):
        return "bad signature"
    return None


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


@dataclass(slots=True)
class Stored:
    item: Item
    expires_at: float
    #: When this node last received a STORE for the key (a replica that got one need not republish).
    refreshed_at: float
    cached: bool = False


class LocalStore:
    """The items this node holds, with their expiry; reading an expired item removes it."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._items: dict[int, Stored] = {}

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
            return "store is full"
        expires_at = now + ttl_s
        if current is not None and current.item == item:
            expires_at = max(expires_at, current.expires_at)
        self._items[key] = Stored(item, expires_at, now, cached and (current is None or current.cached))
        return None

    def get(self, key: int, now: float) -> Stored | None:
        stored = self._items.get(key)
        if stored is not None and stored.expires_at <= now:
            del self._items[key]
            return None
        return stored

    def expire(self, now: float) -> int:
        dead = [key for key, stored in self._items.items() if stored.expires_at <= now]
        for key in dead:
            del self._items[key]
        return len(dead)

    def items(self) -> list[tuple[int, Stored]]:
        return list(self._items.items())

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
