"""The state API that services use: key/value get, put and compare-and-set on a version.

A service does not see records, ballots or groups. It sees a namespace of keys, each holding
bytes and a version (0 while the key has never been written), and three operations:

- ``get(key)``: the value and its version (a linearizable quorum read);
- ``put(key, value)``: write unconditionally; returns the new version;
- ``cas(key, expected_version, value)``: write only if the version is still ``expected_version``
  (0: only if the key was never written); otherwise the current value and version come back.

Each key is a ``quorum`` record (:mod:`p2pdeploy.collective.records`). Two kinds of namespace:

- a *service's* namespace ``NAME@OWNER_HEX``: the state of the service ``NAME@OWNER``, which
  follows the service rather than the node. Each key is the service state record
  ``svcstate/<OWNER_HEX>/<NAME>/<key>`` under a key derived from that name alone, so every node
  that hosts a replica of the service reads and writes the same records, each version signed by
  the node that wrote it; the acceptors keep versions only from keys they trust (as they trust
  the service's manager to start replicas on them) and from the owner. A ``join`` node gives
  this namespace to every replica a service's manager started on it (a replacement replica on
  another node reads what the failed one wrote).
- a *writer's* namespace (any other name, ``service=False``): each key is the record
  ``state/<namespace>/<key>`` signed by the namespace's *writer* identity, under that
  writer's key. A ``join`` node gives a replica started by hand the namespace
  ``NAME@STARTER_KEY`` written with the node's own key, so one starter's replicas of a service on
  that node share their state; an embedding application that wants services on several nodes to
  share such a namespace registers it with one writer identity on each
  (``StateServer.register(namespace, writer)``).

A service never holds a key: the node signs for it (the executor tells the service where the
API is, see ``p2pdeploy.runtime.state_api``).

This module is pure: naming and validation, and the mapping from an operation to the
persistence layer's calls and back. The transport (HTTP on loopback) is in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from p2pdeploy.collective.deployment_messages import OWNER_KEY_BYTES, ServiceId, ServiceIdError
from p2pdeploy.collective.persistence import Persistence, QuorumFinished
from p2pdeploy.collective.records import ServiceStateName, quorum_key
from p2pdeploy.overlay.identity import Identity

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


def service_namespace(service: str, owner: bytes) -> str:
    """The namespace of the state of the service ``service@owner``: ``NAME@OWNER_HEX``, the
    service's identity."""
    namespace = f"{service}@{owner.hex()}"
    parse_service_namespace(namespace)
    return namespace


def parse_service_namespace(namespace: str) -> tuple[str, bytes]:
    """The service name and owner key of a service's namespace ``NAME@OWNER_HEX`` (its
    :class:`ServiceId`, written exactly so: lowercase hex)."""
    try:
        service = ServiceId.parse(namespace) if isinstance(namespace, str) and "@" in namespace else None
    except ServiceIdError:
        service = None
    if service is None or str(service) != namespace:
        raise StateError(f"a service's state namespace is NAME@OWNER: the service's name and "
                         f"{2 * OWNER_KEY_BYTES} lowercase hex digits of its owner's key (got {namespace!r})")
    return service.name, service.owner


def record_name(namespace: str, key: str, *, service: bool = False) -> bytes:
    """The record name of ``key`` in ``namespace`` (a service's namespace with ``service``)."""
    if service:
        name, owner = parse_service_namespace(namespace)
        return ServiceStateName(owner, name, check_key(key)).name
    return b"state/" + check_namespace(namespace) + b"/" + check_key(key)


def overlay_key(writer_public_key: bytes, namespace: str, key: str, *, service: bool = False) -> int:
    """The overlay key of ``key`` in ``namespace``; a service's does not depend on the writer."""
    return quorum_key(writer_public_key, record_name(namespace, key, service=service))


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
    #: ``namespace`` is a service's (``NAME@OWNER_HEX``), whose records every writer shares.
    service: bool = False

    def __post_init__(self) -> None:
        record_name(self.namespace, self.key, service=self.service)
        if self.op == "cas" and (self.expected_version is None or self.expected_version < 0):
            raise StateError(f"compare-and-set needs an expected version >= 0 (got {self.expected_version})")
        if self.op not in ("get", "put", "cas"):
            raise StateError(f"unknown state operation {self.op!r}")

    def start(self, persistence: Persistence, writer: Identity, now: float) -> int:
        """Start the operation on ``persistence``; the query id whose :class:`QuorumFinished` ends it."""
        name = record_name(self.namespace, self.key, service=self.service)
        if self.op == "get":
            return persistence.quorum_read(quorum_key(writer.public_key, name), now)
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
