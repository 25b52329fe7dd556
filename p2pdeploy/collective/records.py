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

This module holds the data and the acceptor's rules as pure functions; the messages that carry
them and the proposer's state machine are in :mod:`p2pdeploy.collective.persistence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, check_item, sign_record
from p2pdeploy.wire import NodeId, message, record

DEFAULT_MAX_RECORD_BYTES = 64 * 1024
MAX_GROUP = 16


def check_record(key: int, item: Item, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str | None:
    """Why ``item`` may not be stored as the record under ``key`` (``None`` when it may)."""
    if not item.signed:
        return "a record must be signed by its writer"
    return check_item(key, item, max_bytes)


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
        _, item = sign_record(self.identity, self.name, self.value, version + 1)
        return item, True, ""


@message(122)
class StoredRecord:
    """An eventual record as a durable store keeps it (never sent)."""

    key: NodeId
    item: Item
    replicas: int
