"""The standard events of a community, as published on the publish/subscribe topics.

Every event is a frozen dataclass with a ``kind`` and a ``topic``; on the wire it is a flat
mapping of attributes (:meth:`attributes`), so subscribers filter on it with the requirements
language (:mod:`p2pdeploy.collective.filters`)::

    kind == "replica_changed" and service == "wiki" and state in {"failed", "stopped"}
    kind == "node_joined" and memory_free >= 2G

| topic      | kind               | attributes (besides ``kind``)                                   |
|------------|--------------------|-----------------------------------------------------------------|
| ``nodes``    | ``node_joined``      | ``node`` (40 hex digits), ``address``, and the node's own attributes (``cpu_free``, ``memory_free``, ``tags``, ...) |
| ``nodes``    | ``node_left``        | ``node``, ``reason`` (``left`` or ``failed``)                   |
| ``services`` | ``service_created``  | ``service``, ``version``, ``replicas``                          |
| ``services`` | ``service_changed``  | ``service``, ``version``, ``replicas``, ``change``               |
| ``services`` | ``service_removed``  | ``service``                                                   |
| ``replicas`` | ``replica_changed``  | ``service``, ``replica``, ``node``, ``state``, ``previous``, ``reason``, ``run`` |

Replica states are the supervisor's (:class:`p2pdeploy.fabric.supervisor.ReplicaState`:
requested, fetching, installing, starting, running, stopping, failed, stopped), carried by
their names. :func:`from_attributes` turns a delivered attribute mapping back into an event.
Who publishes them (the overlay when a node joins, the deployer, the supervisors) is theirs to
decide; this module only fixes the vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from p2pdeploy.collective.filters import event_attributes
from p2pdeploy.fabric.supervisor import ReplicaState

TOPIC_NODES = "nodes"
TOPIC_SERVICES = "services"
TOPIC_REPLICAS = "replicas"
TOPICS = (TOPIC_NODES, TOPIC_SERVICES, TOPIC_REPLICAS)

#: Attribute names the node events use themselves; a node attribute may not take them.
_NODE_RESERVED = frozenset({"kind", "node", "address"})


def node_hex(node_id: int) -> str:
    return f"{node_id:040x}"


def _node_id(text: Any) -> int:
    if not isinstance(text, str) or len(text) != 40:
        raise ValueError(f"node must be 40 hex digits (got {text!r})")
    return int(text, 16)


@dataclass(frozen=True, slots=True)
class NodeJoined:
    kind: ClassVar[str] = "node_joined"
    topic: ClassVar[str] = TOPIC_NODES

    node_id: int
    address: str
    #: The node's description (``p2pdeploy.resource.description.node_attributes``).
    node_attributes: Mapping[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        clash = _NODE_RESERVED & set(self.node_attributes)
        if clash:
            raise ValueError(f"node attributes may not be named {', '.join(sorted(clash))}")
        return event_attributes({**self.node_attributes, "kind": self.kind, "node": node_hex(self.node_id),
                                 "address": self.address})


@dataclass(frozen=True, slots=True)
class NodeLeft:
    kind: ClassVar[str] = "node_left"
    topic: ClassVar[str] = TOPIC_NODES

    node_id: int
    reason: str = "left"  # or "failed"

    def attributes(self) -> dict[str, Any]:
        return {"kind": self.kind, "node": node_hex(self.node_id), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ServiceCreated:
    kind: ClassVar[str] = "service_created"
    topic: ClassVar[str] = TOPIC_SERVICES

    service: str
    version: int
    replicas: int

    def attributes(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service, "version": self.version, "replicas": self.replicas}


@dataclass(frozen=True, slots=True)
class ServiceChanged:
    kind: ClassVar[str] = "service_changed"
    topic: ClassVar[str] = TOPIC_SERVICES

    service: str
    version: int
    replicas: int
    #: What changed, for people: ``scaled``, ``updated``, ``moved``...
    change: str = ""

    def attributes(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service, "version": self.version, "replicas": self.replicas,
                "change": self.change}


@dataclass(frozen=True, slots=True)
class ServiceRemoved:
    kind: ClassVar[str] = "service_removed"
    topic: ClassVar[str] = TOPIC_SERVICES

    service: str

    def attributes(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service}


@dataclass(frozen=True, slots=True)
class ReplicaChanged:
    """A replica of ``service`` on ``node_id`` moved to ``state`` (from ``previous``)."""

    kind: ClassVar[str] = "replica_changed"
    topic: ClassVar[str] = TOPIC_REPLICAS

    service: str
    replica_id: str
    node_id: int
    state: ReplicaState
    previous: ReplicaState | None = None
    reason: str = ""
    run: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.state, ReplicaState):
            raise TypeError(f"state must be a ReplicaState (got {self.state!r})")

    def attributes(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service, "replica": self.replica_id,
                "node": node_hex(self.node_id), "state": self.state.value,
                "previous": self.previous.value if self.previous is not None else "",
                "reason": self.reason, "run": self.run}

    @classmethod
    def from_supervisor(cls, event: Any, service: str, node_id: int) -> ReplicaChanged:
        """From the supervisor's local ``ReplicaStateChanged`` event on ``node_id``."""
        return cls(service, event.replica_id, node_id, event.new, event.old, event.reason, event.run)


StandardEvent = NodeJoined | NodeLeft | ServiceCreated | ServiceChanged | ServiceRemoved | ReplicaChanged
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (NodeJoined, NodeLeft, ServiceCreated, ServiceChanged,
                                                           ServiceRemoved, ReplicaChanged)}


def from_attributes(attributes: Mapping[str, Any]) -> StandardEvent | None:
    """The standard event an attribute mapping describes; None for another kind of event.

    Raise ``ValueError`` when it claims a standard kind but lacks or garbles an attribute.
    """
    kind = attributes.get("kind")
    try:
        if kind == "node_joined":
            rest = {k: v for k, v in attributes.items() if k not in _NODE_RESERVED}
            return NodeJoined(_node_id(attributes["node"]), str(attributes["address"]), rest)
        if kind == "node_left":
            return NodeLeft(_node_id(attributes["node"]), str(attributes.get("reason", "left")))
        if kind == "service_created":
            return ServiceCreated(str(attributes["service"]), int(attributes["version"]), int(attributes["replicas"]))
        if kind == "service_changed":
            return ServiceChanged(str(attributes["service"]), int(attributes["version"]), int(attributes["replicas"]),
                                  str(attributes.get("change", "")))
        if kind == "service_removed":
            return ServiceRemoved(str(attributes["service"]))
        if kind == "replica_changed":
            previous = attributes.get("previous") or None
            return ReplicaChanged(str(attributes["service"]), str(attributes["replica"]), _node_id(attributes["node"]),
                                  ReplicaState(attributes["state"]), ReplicaState(previous) if previous else None,
                                  str(attributes.get("reason", "")), int(attributes.get("run", 0)))
    except KeyError as exc:
        raise ValueError(f"a {kind} event needs the attribute {exc.args[0]}") from None
    return None


__all__ = [
    "EVENT_TYPES",
    "TOPICS",
    "TOPIC_NODES",
    "TOPIC_REPLICAS",
    "TOPIC_SERVICES",
    "NodeJoined",
    "NodeLeft",
    "ReplicaChanged",
    "ReplicaState",
    "ServiceChanged",
    "ServiceCreated",
    "ServiceRemoved",
    "StandardEvent",
    "from_attributes",
    "node_hex",
]
