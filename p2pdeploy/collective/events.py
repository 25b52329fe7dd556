"""The standard events of a community, as published on the publish/subscribe topics.

Every event is a frozen dataclass with a ``topic`` and a ``kind`` (its class name in snake
case); on the wire it is a flat mapping of attributes, its fields under the names below
(:meth:`attributes`), so subscribers filter on it with the requirements language
(:mod:`p2pdeploy.collective.filters`)::

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

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
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


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {value!r})")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number (got {value!r})")
    return value


#: How a field travels as an attribute, by field name: (attribute name, to the attribute, back).
#: A field not named here travels under its own name, as a string or a whole number.
_FIELDS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "node_id": ("node", node_hex, _node_id),
    "replica_id": ("replica", str, _text),
    "state": ("state", lambda state: state.value, ReplicaState),
    "previous": ("previous", lambda state: "" if state is None else state.value,
                 lambda text: ReplicaState(text) if text else None),
}
_PLAIN = {"str": _text, "int": _whole}


class _Event:
    """What every standard event shares: its attributes are its fields, by :data:`_FIELDS`."""

    __slots__ = ()
    #: The event's name in snake case (``ServiceChanged``: ``service_changed``).
    kind: ClassVar[str]
    topic: ClassVar[str]

    def __init_subclass__(cls, topic: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if topic:  # (@dataclass(slots=True) makes the class again, without the keyword)
            cls.topic = topic
            cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            name, out, _ = _FIELDS.get(f.name, (f.name, _same, _same))
            attributes[name] = out(getattr(self, f.name))
        return attributes

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> Any:
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name, _, back = _FIELDS.get(f.name) or (f.name, _same, _PLAIN[f.type])  # type: ignore[index]
            if name in attributes:
                try:
                    values[f.name] = back(attributes[name])
                except ValueError as exc:
                    raise ValueError(f"a {cls.kind} event's {name} {exc}") from None
            elif f.default is MISSING:
                raise ValueError(f"a {cls.kind} event needs the attribute {name}")
        return cls(**values)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class NodeJoined(_Event, topic=TOPIC_NODES):
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

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> NodeJoined:
        if "node" not in attributes or "address" not in attributes:
            raise ValueError("a node_joined event needs the attributes node and address")
        rest = {k: v for k, v in attributes.items() if k not in _NODE_RESERVED}
        return cls(_node_id(attributes["node"]), _text(attributes["address"]), rest)


@dataclass(frozen=True, slots=True)
class NodeLeft(_Event, topic=TOPIC_NODES):
    node_id: int
    reason: str = "left"  # or "failed"


@dataclass(frozen=True, slots=True)
class ServiceCreated(_Event, topic=TOPIC_SERVICES):
    """A service was deployed: its first ``version``, at ``replicas`` replicas."""

    service: str
    version: int
    replicas: int


@dataclass(frozen=True, slots=True)
class ServiceChanged(_Event, topic=TOPIC_SERVICES):
    service: str
    version: int
    replicas: int
    #: What changed, for people: ``scaled``, ``updated``, ``moved``...
    change: str = ""


@dataclass(frozen=True, slots=True)
class ServiceRemoved(_Event, topic=TOPIC_SERVICES):
    service: str


@dataclass(frozen=True, slots=True)
class ReplicaChanged(_Event, topic=TOPIC_REPLICAS):
    """A replica of ``service`` on ``node_id`` moved to ``state`` (from ``previous``)."""

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

    @classmethod
    def from_supervisor(cls, event: Any, service: str, node_id: int) -> ReplicaChanged:
        """From the supervisor's local ``ReplicaStateChanged`` event on ``node_id``."""
        return cls(service, event.replica_id, node_id, event.new, event.old, event.reason, event.run)


StandardEvent = NodeJoined | NodeLeft | ServiceCreated | ServiceChanged | ServiceRemoved | ReplicaChanged
EVENT_TYPES: dict[str, type[_Event]] = {cls.kind: cls for cls in (NodeJoined, NodeLeft, ServiceCreated, ServiceChanged,
                                                                   ServiceRemoved, ReplicaChanged)}


def from_attributes(attributes: Mapping[str, Any]) -> StandardEvent | None:
    """The standard event an attribute mapping describes; None for another kind of event.

    Raise ``ValueError`` when it claims a standard kind but lacks or garbles an attribute.
    """
    kind = attributes.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    return None if cls is None else cls.from_attributes(attributes)


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
