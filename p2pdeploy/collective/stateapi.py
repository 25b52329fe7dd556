"""The state API that services use: key/value get, put and compare-and-set on a version.

A service does not see records, ballots or groups. It sees a namespace of keys, each holding
bytes and a version (0 while the key has never been written), and three operations:

- ``get(key)``: the value and its version (a linearizable quorum read);
- ``put(key, value)``: write unconditionally; returns the new version;
- ``cas(key, expected_version, value)``: write only if the version is still ``expected_version``
  (0: only if the key was never written); otherwise the current value and version come back.

Each key is a ``quorum`` record (:mod:`p2pdeploy.collective.records`) named
``state/<namespace>/<key>`` and signed by the namespace's *writer* identity. A ``join`` node
gives each service the namespace ``NAME@DEPLOYER_KEY`` written with the node's own key, so one
deployer's replicas of a service on that node share their state; an embedding application that
wants services on several nodes to share a namespace registers it with one writer identity on
each (``StateServer.register(namespace, writer)``). A service never holds the key: the node
signs for it (the executor tells the service where the API is, see ``p2pdeploy.runtime.state_api``).

This module is pure: naming and validation, and the mapping from an operation to the
persistence layer's calls and back. The transport (HTTP on loopback) is in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from p2pdeploy.collective.persistence import Persistence, QuorumFinished
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.storage import record_key

MAX_KEY_BYTES = 256
MAX_NAMESPACE_BYTES = 128
_KEY_FORBIDDEN = frozenset("\x00\r\n")


class StateError(ValueError):
    """A state key, namespace or value is not valid; the message says which and why."""


def check_namespace(namespace: str) -> bytes:
    raw = namespace.encode("utf-8") if isinstance(namespace, str) else b""
    if not raw or len(raw) > MAX_NAMESPACE_BYTES or "/" in namespace or any(ch in _KEY_FORBIDDEN for ch in namespace):
        raise StateError(f"a state namespace is 1 to {MAX_NAMESPACE_BYTES} bytes of UTF-8 without '/' "
                         f"or control characters (got {namespace!r})")
    return raw


def check_key(key: str) -> bytes:
    raw = key.encode("utf-8") if isinstance(key, str) else b""
    if not raw or len(raw) > MAX_KEY_BYTES or any(ch in _KEY_FORBIDDEN for ch in key):
        raise StateError(f"a state key is 1 to {MAX_KEY_BYTES} bytes of UTF-8 without NUL or line breaks "
                         f"(got {key!r})")
    return raw


def record_name(namespace: str, key: str) -> bytes:
    """The record name of ``key`` in ``namespace``."""
    return b"state/" + check_namespace(namespace) + b"/" + check_key(key)


def overlay_key(writer_public_key: bytes, namespace: str, key: str) -> int:
    return record_key(writer_public_key, record_name(namespace, key))


@dataclass(frozen=True, slots=True)
class StateResult:
    """What a state operation returns to the service."""

    outcome: Literal["ok", "absent", "conflict", "unavailable"]
    value: bytes = b""
    version: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StateRequest:
    """One operation on a namespace, as the service asked for it."""

    op: Literal["get", "put", "cas"]
    namespace: str
    key: str
    value: bytes = b""
    expected_version: int | None = None

    def __post_init__(self) -> None:
        record_name(self.namespace, self.key)
        if self.op == "cas" and (self.expected_version is None or self.expected_version < 0):
            raise StateError(f"compare-and-set needs an expected version >= 0 (got {self.expected_version})")
        if self.op not in ("get", "put", "cas"):
            raise StateError(f"unknown state operation {self.op!r}")

    def start(self, persistence: Persistence, writer: Identity, now: float) -> int:
        """Start the operation on ``persistence``; the query id whose :class:`QuorumFinished` ends it."""
        name = record_name(self.namespace, self.key)
        if self.op == "get":
            return persistence.quorum_read(record_key(writer.public_key, name), now)
        if self.op == "put":
            return persistence.quorum_put(writer, name, self.value, now)
        assert self.expected_version is not None
        return persistence.quorum_cas(writer, name, self.expected_version, self.value, now)

    def result(self, event: QuorumFinished) -> StateResult:
        """What the service gets back from the finishing event."""
        item = event.item
        value = item.value if item is not None else b""
        if event.ok:
            if self.op == "get" and item is None:
                return StateResult("absent")
            return StateResult("ok", value, event.version)
        if event.reason.startswith("version mismatch"):
            return StateResult("conflict", value, event.version, event.reason)
        return StateResult("unavailable", detail=event.reason)
