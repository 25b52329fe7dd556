"""The service record and the messages of service deployment.

A service is ``NAME@OWNER``: a name chosen by the key that owns it (``OWNER``, 64 hex digits of
its Ed25519 public key). Its desired state, a :class:`ServiceSpec`, is the value of the quorum
record ``service/NAME`` of that key (:mod:`p2pdeploy.collective.records`), so only the owner
can write it, every change is linearizable, and the record's version is the service's
generation. The record lives with the group of nodes closest to its key; the closest live one
of them manages the service (:mod:`p2pdeploy.collective.deployment`).

Between a manager and the nodes that host its replicas travel :class:`ReplicaReport` (a host's
replicas of one service and their states, on every change and every ``report_interval_s``) and
:class:`ReportAck` (the manager's answer: who manages, the record's group, which replicas to
stop). Anyone may ask a group member about a service (:class:`ServiceQuery`); the manager
answers with what it wants and what it sees (:class:`ServiceReport`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pdeploy.overlay.routing import Contact
from p2pdeploy.resource.manifest import NAME_RE
from p2pdeploy.resource.protocol import service_key_of
from p2pdeploy.wire import NodeId, message, record

#: The record name prefix of a service's desired state under its owner's key.
SERVICE_RECORD_PREFIX = b"service/"
#: A public key on the wire.
OWNER_KEY_BYTES = 32
#: Replicas one report or status answer carries at most (a host runs few of one service).
MAX_REPORTED = 64
#: A manager's most recent decisions kept for ``status`` and ``events``.
MAX_DECISIONS = 32


class ServiceIdError(ValueError):
    """A service identity that does not parse (``NAME@OWNER``)."""


@dataclass(frozen=True, slots=True)
class ServiceId:
    """``NAME@OWNER``: the service ``name`` owned by the Ed25519 key ``owner``."""

    name: str
    owner: bytes

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ServiceIdError(f"service name {self.name!r} must be 1 to 48 of a-z, 0-9 and -, starting "
                                 f"with a letter or digit")
        if len(self.owner) != OWNER_KEY_BYTES:
            raise ServiceIdError(f"a service's owner is a {OWNER_KEY_BYTES}-byte public key (got {len(self.owner)})")

    @classmethod
    def parse(cls, text: str, default_owner: bytes | None = None) -> ServiceId:
        """``NAME@OWNER`` (64 hex digits), or ``NAME`` alone with ``default_owner``."""
        name, at, owner = text.partition("@")
        if not at:
            if default_owner is None:
                raise ServiceIdError(f"{text!r}: a service is NAME@OWNER (64 hex digits of the owner's key)")
            return cls(name, default_owner)
        try:
            key = bytes.fromhex(owner)
        except ValueError:
            raise ServiceIdError(f"{text!r}: the owner after @ must be 64 hex digits") from None
        if len(key) != OWNER_KEY_BYTES:
            raise ServiceIdError(f"{text!r}: the owner after @ must be 64 hex digits (got {len(owner)})")
        return cls(name, key)

    @property
    def record_name(self) -> bytes:
        return SERVICE_RECORD_PREFIX + self.name.encode()

    @property
    def key(self) -> int:
        """The overlay key of the service's record: its group are the nodes closest to it."""
        return service_key_of(self.name, self.owner)

    @property
    def topic(self) -> str:
        """The publish/subscribe topic of the service's events."""
        return f"service/{self}"

    def short(self) -> str:
        return f"{self.name}@{self.owner.hex()[:12]}"

    def __str__(self) -> str:
        return f"{self.name}@{self.owner.hex()}"


@message(140)
class ServiceSpec:
    """A service's desired state: the value of its quorum record, written by its owner."""

    name: str
    #: The bundle's ``manifest.toml`` (placement, requirements and resources are read from it).
    manifest: bytes
    #: The blob that holds the signed bundle (20 bytes), its signer and signature.
    bundle_blob: bytes
    bundle_key: bytes
    bundle_signature: bytes
    #: The deployer's override of the manifest's placement: a fixed count (0: the manifest's) ...
    replicas: int = 0
    #: ... or an availability target (0: the manifest's).
    availability: float = 0.0
    #: Undeployed: every replica is stopped, and the name stays its owner's.
    undeployed: bool = False

    @property
    def blob_id(self) -> int:
        return int.from_bytes(self.bundle_blob, "big")


@record
class ReplicaEntry:
    """One replica as its host reports it."""

    replica_id: str
    state: str
    reason: str
    healthy: bool
    run: int
    bundle_blob: bytes = b""


@message(141)
class ReplicaReport:
    """A host's replicas of ``service`` (all of them: one absent is not there any more)."""

    service: NodeId
    host: NodeId
    replicas: list[ReplicaEntry]


@message(142)
class ReportAck:
    """A manager's answer to a report; ``manager`` is who manages (another node: report there)."""

    service: NodeId
    manager: Contact
    group: list[Contact]
    #: Finished replicas the manager no longer wants (undeployed, surplus, replaced): the host
    #: removes their files at once rather than after its retention period, freeing their disk.
    release: list[str] = field(default_factory=list)


@message(143)
class ServiceQuery:
    query_id: int
    service: NodeId


@record
class PlacedReplica:
    """A replica as its manager sees it."""

    replica_id: str
    host: Contact
    state: str
    reason: str
    healthy: bool
    since_s: float
    #: The blob of the bundle it runs (its version).
    bundle_blob: bytes = b""


@message(144)
class ServiceReport:
    """A group member's answer to a query: ``managing`` when it is the manager, else who is."""

    query_id: int
    service: NodeId
    managing: bool
    manager: Contact | None
    version: int
    desired: int
    desired_reason: str
    replicas: list[PlacedReplica]
    decisions: list[str]
    pending: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """A manager's decision about a service, published on its topic and kept for ``status``:
    ``placed``, ``replaced``, ``surplus_stopped``, ``refused``, ``pending``, ``count``,
    ``manager_moved``, ``undeployed``."""

    service: str
    decision: str
    reason: str
    at_s: float
    replica_id: str = ""
    host: int = 0

    def __str__(self) -> str:
        what = f" {self.replica_id}" if self.replica_id else ""
        where = f" on {f'{self.host:040x}'[:12]}" if self.host else ""
        return f"{self.decision}{what}{where}: {self.reason}" if self.reason else f"{self.decision}{what}{where}"


@message(146)
class ManagerHandoff:
    """A manager that yields (a closer member of the group is back) tells its successor where the
    replicas are; the successor counts each once its host confirms it."""

    service: NodeId
    replicas: list[PlacedReplica]


@message(147)
class ManagerAlive:
    """A manager to the other members of its record's group, every report interval: it manages
    ``service``. A member that stops hearing it counts it as gone when choosing the manager (its
    failure detector, which probes one watched peer per period, may take long to notice)."""

    service: NodeId


@message(145)
class ServicesList:
    """The value of an owner's list record: the names of its services, for ``ls``."""

    names: list[str]


__all__ = [
    "Decision",
    "MAX_DECISIONS",
    "MAX_REPORTED",
    "PlacedReplica",
    "ReplicaEntry",
    "ReplicaReport",
    "ReportAck",
    "SERVICE_RECORD_PREFIX",
    "ServiceId",
    "ServiceIdError",
    "ServiceQuery",
    "ServiceReport",
    "ServiceSpec",
    "ServicesList",
    "ManagerAlive",
    "ManagerHandoff",
]
