"""Mutable records: signed by their writer, with a sequence number, in two consistency types.

A record is the overlay's signed :class:`~p2pdeploy.overlay.storage.Item`: a value, the
writer's Ed25519 public key, a name, a sequence number and a signature. It lives under
``record_key(public_key, name)``, so only the holder of the private key can produce a record
that any node will store (``check_item`` verifies key, name and signature on every hop).

Two consistency types, chosen per record:

- ``eventual``: the record is pushed to the ``replicas`` nodes closest to its key; a read asks
  them and the highest valid sequence wins (equal sequences: the larger signature, so every
  node picks the same one), and replicas that answered an older one are repaired (read repair).
  Concurrent writers may overwrite each other; nothing is lost that a later write did not replace.
- ``quorum``: linearizable single-key reads, writes and compare-and-set, by single-decree Paxos
  run again for every change (Rystsov's CASPaxos, 2018). The key's *group* is the ``N`` nodes
  closest to it when the first write happened, recorded with every accepted value. A change is
  a function of the current record: a proposer (any node) takes a unique ballot, collects
  promises from a majority of the group (each returns the record it last accepted), applies the
  function to the record of the highest accepted ballot, and has the result accepted by a
  majority. R = W = a majority of N, so R + W > N, and an acceptor refuses any ballot lower than
  one it promised: the version check that makes a write acknowledged by W acceptors survive
  every later read and write while fewer than a majority of the group have lost their state.
  A read runs the same two phases with the identity function, so it never returns a value older
  than one acknowledged before it began.

Assumptions of the ``quorum`` type, which the tests exercise and the module does not hide:
acceptors keep their state across a crash (the durable store); the group is fixed at the first
write (no reconfiguration: a group that lost a majority for good stays unavailable, it does not
silently restart empty); a proposer creates a key only when each of the ``N`` closest nodes it
found answered with no state (a closer node that stays silent may hold the key, so the operation
fails rather than fork the key); and nodes that join later closer to the key than its group do
not take part in it.

*Service state records* are the one kind of record several keys write: the state of the
service ``NAME@OWNER``, which follows the service from host to host rather than staying with
the node that ran a replica. Such a record is named ``svcstate/<OWNER_HEX>/<NAME>/<key>`` and
lives under :func:`shared_record_key` of its name alone, whoever writes it; each version is
signed by its writer as usual (the key is part of what is signed). Names with that prefix are
reserved: a record so named is valid only under that key. Who may write one is an acceptor's
decision (:mod:`p2pdeploy.collective.persistence_admission`): a key it trusts, or the owner the
name names; anyone else's version is refused and counted.

This module holds the data and the acceptor's rules as pure functions; the messages that carry
them and the proposer's state machine are in :mod:`p2pdeploy.collective.persistence`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from p2pdeploy.collective.deployment_messages import OWNER_KEY_BYTES, ServiceId
from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, check_item, record_key, sign_record, signature_valid
from p2pdeploy.wire import NodeId, message, record

DEFAULT_MAX_RECORD_BYTES = 64 * 1024
MAX_GROUP = 16

#: The prefix of service state records' names (reserved: see the module docstring).
SERVICE_STATE_PREFIX = b"svcstate/"
#: What the key of a service state record hashes before its name, so it meets no other key.
SERVICE_STATE_DOMAIN = b"p2pdeploy service state\n"
#: A key within a service's state: 1 to this many bytes, without NUL or line breaks.
MAX_STATE_KEY_BYTES = 256
_STATE_KEY_FORBIDDEN = frozenset(b"\x00\r\n")


@dataclass(frozen=True, slots=True)
class ServiceStateName:
    """The parts of a service state record's name: the service ``service@owner`` and its key."""

    owner: bytes
    service: str
    key: bytes

    def __post_init__(self) -> None:
        ServiceId(self.service, self.owner)  # the service's identity is valid (a ValueError names why)
        if not 1 <= len(self.key) <= MAX_STATE_KEY_BYTES or _STATE_KEY_FORBIDDEN & set(self.key):
            raise ValueError(f"a state key is 1 to {MAX_STATE_KEY_BYTES} bytes without NUL or line breaks "
                             f"(got {self.key!r})")

    @property
    def name(self) -> bytes:
        """The record's name: ``svcstate/<OWNER_HEX>/<NAME>/<key>``."""
        return b"%s%s/%s/%s" % (SERVICE_STATE_PREFIX, self.owner.hex().encode(), self.service.encode(), self.key)

    @classmethod
    def parse(cls, name: bytes) -> ServiceStateName | None:
        """The parts of ``name``; ``None`` when it is not a valid service state record's name."""
        if not name.startswith(SERVICE_STATE_PREFIX):
            return None
        parts = name[len(SERVICE_STATE_PREFIX):].split(b"/", 2)
        if len(parts) != 3:
            return None
        owner_hex, service, key = parts
        if len(owner_hex) != 2 * OWNER_KEY_BYTES or owner_hex != owner_hex.lower():
            return None
        try:
            parsed = cls(bytes.fromhex(owner_hex.decode("ascii")), service.decode("ascii"), key)
        except (ValueError, UnicodeDecodeError):
            return None
        return parsed if parsed.name == name else None


def shared_record_key(name: bytes) -> int:
    """The overlay key of the service state record ``name``: from the name alone, so every
    writer of the service's state reads and writes the same record."""
    return key_id(SERVICE_STATE_DOMAIN + name)


def is_service_state(name: bytes) -> bool:
    """True when ``name`` is in the reserved namespace of service state records."""
    return name.startswith(SERVICE_STATE_PREFIX)


def quorum_key(public_key: bytes, name: bytes) -> int:
    """The key the record ``name`` written by ``public_key`` lives under: its writer's
    (``record_key``), or for a service state record its name's (:func:`shared_record_key`)."""
    return shared_record_key(name) if is_service_state(name) else record_key(public_key, name)


def check_record(key: int, item: Item, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str | None:
    """Why ``item`` may not be stored as the record under ``key`` (``None`` when it may). Who
    may write a service state record is the acceptor's call (:func:`service_state_refusal`)."""
    if not item.signed:
        return "a record must be signed by its writer"
    if not is_service_state(item.name):
        return check_item(key, item, max_bytes)
    if len(item.value) > max_bytes:
        return f"value of {len(item.value)} bytes is over the limit of {max_bytes}"
    if not 0 <= item.sequence < 1 << 64:
        return "sequence out of range"
    if ServiceStateName.parse(item.name) is None:
        return "a service state record's name is svcstate/<OWNER_HEX>/<NAME>/<key>"
    if shared_record_key(item.name) != key:
        return "a service state record's key does not derive from its name"
    if not signature_valid(key, item):
        return "bad signature"
    return None


def service_state_refusal(item: Item, trusts: Callable[[bytes], bool]) -> str | None:
    """Why a (checked) service state record by ``item.public_key`` may not be kept by a node
    whose trust is ``trusts`` (``None``: it may): its writer must be a key the node trusts (as
    it trusts the managers that start a service's replicas on it) or the service's owner."""
    parsed = ServiceStateName.parse(item.name)
    if parsed is None:
        return "a service state record's name is svcstate/<OWNER_HEX>/<NAME>/<key>"
    if item.public_key == parsed.owner or trusts(item.public_key):
        return None
    return (f"not authorized: the state of {parsed.service}@{parsed.owner.hex()[:16]}… is written by its owner "
            f"or a key this node trusts, not {item.public_key.hex()[:16]}…")


# -- quorum records: ballots and the acceptor ------------------------------------------------


@record(order=True)
class Ballot:
    """A Paxos ballot: a counter, then the proposer's id and a random nonce drawn per attempt,
    so a proposer that restarted without memory of its counter still never reuses a ballot."""

    counter: int
    node: NodeId
    nonce: int = 0

    def __post_init__(self) -> None:
        if self.counter < 0:
            raise ValueError(f"ballot counter must be >= 0 (got {self.counter})")


ZERO = Ballot(0, 0, 0)


@message(121)
class AcceptorState:
    """What an acceptor of a quorum key keeps durably (it is also the stored form, never sent)."""

    key: NodeId
    promised: Ballot = ZERO
    accepted: Ballot = ZERO
    item: Item | None = None
    group: list[Contact] = field(default_factory=list)

    @property
    def has_value(self) -> bool:
        return self.accepted != ZERO


def on_prepare(state: AcceptorState, ballot: Ballot) -> tuple[bool, AcceptorState]:
    """Paxos phase 1b: promise ``ballot`` unless a higher one was promised; the new state."""
    if ballot < state.promised or ballot == ZERO:
        return False, state
    return True, AcceptorState(state.key, ballot, state.accepted, state.item, state.group)


def on_accept(state: AcceptorState, ballot: Ballot, item: Item, group: list[Contact]) -> tuple[bool, AcceptorState]:
    """Paxos phase 2b: accept ``item`` at ``ballot`` unless a higher ballot was promised."""
    if ballot < state.promised or ballot == ZERO:
        return False, state
    return True, AcceptorState(state.key, ballot, ballot, item, list(group))


def check_group(group: list[Contact], size: int | None = None) -> str | None:
    if not group or len(group) > MAX_GROUP:
        return f"a group has 1 to {MAX_GROUP} members (got {len(group)})"
    if len({c.node_id for c in group}) != len(group):
        return "a group lists a node twice"
    if size is not None and len(group) > size:
        return f"a group has at most {size} members here (got {len(group)})"
    return None


def majority(group_size: int) -> int:
    return group_size // 2 + 1


@dataclass(frozen=True, slots=True)
class Change:
    """What a quorum operation does to the current record: read, put or compare-and-set.

    ``apply`` returns the record to accept and whether the operation succeeded; a read and a
    compare-and-set whose version did not match accept the current record unchanged (which
    still needs a majority, so the outcome is linearizable).
    """

    kind: Literal["read", "put", "cas"]
    identity: Identity | None = None
    name: bytes = b""
    value: bytes = b""
    expected_version: int | None = None

    def apply(self, current: Item | None, already: Item | None) -> tuple[Item | None, bool, str]:
        """``(record to accept, ok, reason)``; ``already`` is what this operation proposed before
        (a retry that finds it in place has succeeded and must not apply itself twice)."""
        if self.kind == "read":
            return current, True, ""
        if already is not None and current == already:
            return current, True, ""
        version = current.sequence if current is not None else 0
        if self.kind == "cas" and self.expected_version != version:
            return current, False, f"version mismatch: expected {self.expected_version}, found {version}"
        assert self.identity is not None
        key = quorum_key(self.identity.public_key, self.name)
        _, item = sign_record(self.identity, self.name, self.value, version + 1, key=key)
        return item, True, ""


@message(122)
class StoredRecord:
    """An eventual record as a durable store keeps it (never sent)."""

    key: NodeId
    item: Item
    replicas: int
