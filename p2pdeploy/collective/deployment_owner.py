"""The owner's side of service deployment: deploy, scale, undeploy, status and the list of services.

A mixin of the :class:`~p2pdeploy.collective.deployment.Deployment` layer, as the persistence
layer's parts are of it. An owner's change is a few steps, each an operation of a lower layer:
check that some node could ever run the service (the prospector's largest values), store the
bundle as a pinned blob, read the service's quorum record and write the next version by
compare-and-set, and add the name to the owner's list (an eventual record, for ``ls``). A status
query asks the members of the record's group (found by an overlay lookup of its key); the
manager answers with what it wants and sees, another member says who manages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy import wire
from p2pdeploy.collective.allocator import impossible_reason
from p2pdeploy.collective.deployment_messages import (
    ServiceId,
    ServiceQuery,
    ServiceReport,
    ServicesList,
    ServiceSpec,
)
from p2pdeploy.collective.persistence import Persistence
from p2pdeploy.collective.persistence_messages import BlobStored, QuorumFinished, RecordFound, RecordStored
from p2pdeploy.collective.prospector import Prospector
from p2pdeploy.collective.prospector_queries import AggregateFinished
from p2pdeploy.collective.service_manager import _constraints
from p2pdeploy.core import Address
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import record_key, sign_record
from p2pdeploy.resource.bundle import SignedBundle
from p2pdeploy.resource.manifest import Manifest

#: The owner's list of its services (an eventual record under its key), for ``ls``.
SERVICES_LIST_NAME = b"services"
#: Services one owner's list holds at most.
MAX_LISTED = 256


# -- events for the driver ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeployFinished:
    """A deploy, scale or undeploy ended: ``ok`` when the record was written (``version``)."""

    op_id: int
    service: str
    action: str
    ok: bool
    version: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StatusFinished:
    """A status query ended: the manager's report (``None`` when no member of the group answered)."""

    query_id: int
    service: str
    report: ServiceReport | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ServicesListed:
    query_id: int
    owner: bytes
    names: list[str]


@dataclass(slots=True)
class _OwnerOp:
    """A deploy, scale or undeploy by the owner: check, store the bundle, read, write, list."""

    op_id: int
    action: str
    service: ServiceId
    spec: ServiceSpec | None = None
    bundle: SignedBundle | None = None
    manifest: Manifest | None = None
    manifest_text: bytes = b""
    change: dict[str, Any] = field(default_factory=dict)
    phase: str = "checking"
    waiting: set[int] = field(default_factory=set)
    largest: dict[str, Any] = field(default_factory=dict)
    version: int = 0


@dataclass(slots=True)
class _StatusOp:
    query_id: int
    service: ServiceId
    deadline: float
    asked: set[int] = field(default_factory=set)
    best: ServiceReport | None = None


class OwnerOperations:
    """The owner's API and the status queries of the :class:`Deployment` layer (a mixin)."""

    identity: Identity
    contact: Contact
    overlay: Kademlia
    persistence: Persistence
    prospector: Prospector
    config: Any
    _owner_ops: dict[int, _OwnerOp]
    _op_of: dict[int, _OwnerOp]
    _status_ops: dict[int, _StatusOp]
    _status_by_lookup: dict[int, _StatusOp]
    _list_reads: dict[int, tuple[int, bytes]]
    _next_op: int
    records: dict[int, Any]
    send: Callable[[Address, Any], None]
    emit: Callable[[Any], None]
    set_timer: Callable[[Any, float], None]
    cancel_timer: Callable[[Any], None]
    _on_query: Callable[[Address, ServiceQuery, float], None]
    _fresh_contact: Callable[[Contact], Contact]
    dropped: Any

    def deploy(self, bundle: SignedBundle, manifest_text: bytes, now: float, *, replicas: int | None = None,
               availability: float | None = None) -> int:
        """Deploy (or update) ``bundle``, whose ``manifest.toml`` is ``manifest_text``, as the
        service of the manifest's name owned by this node's key; emits :class:`DeployFinished`
        once the record is written. Before, it checks that some node could ever run it (``no node
        offers 64 cores; the largest offers 8``) and stores the bundle as a pinned blob. Raises
        ``ManifestError`` for a manifest that is not valid."""
        manifest = Manifest.parse(manifest_text)
        if replicas is not None and availability is not None:
            raise ValueError("give replicas or availability, not both")
        if replicas is not None and not 1 <= replicas <= 64:
            raise ValueError(f"replicas must be between 1 and 64 (got {replicas})")
        if availability is not None and not 0 < availability < 1:
            raise ValueError(f"availability must be between 0 and 1 (got {availability})")
        service = ServiceId(manifest.name, self.identity.public_key)
        op = self._new_owner_op("deploy", service)
        op.bundle, op.manifest, op.manifest_text = bundle, manifest, manifest_text
        op.change = {"replicas": replicas or 0, "availability": availability or 0.0}
        attributes = self._numeric_attributes(manifest)
        for attribute in attributes:
            query = self.prospector.aggregate(attribute, "max", now)
            op.waiting.add(query)
            self._op_of[query] = op
        if not op.waiting:
            self._store_bundle(op, now)
        return op.op_id

    def scale(self, name: str, now: float, *, replicas: int | None = None, availability: float | None = None) -> int:
        """Change the replica count (or availability target) of this key's service ``name``."""
        if (replicas is None) == (availability is None):
            raise ValueError("give replicas or availability")
        if replicas is not None and not 1 <= replicas <= 64:
            raise ValueError(f"replicas must be between 1 and 64 (got {replicas})")
        if availability is not None and not 0 < availability < 1:
            raise ValueError(f"availability must be between 0 and 1 (got {availability})")
        op = self._new_owner_op("scale", ServiceId(name, self.identity.public_key))
        op.change = {"replicas": replicas or 0, "availability": availability or 0.0}
        self._read_for(op, now)
        return op.op_id

    def undeploy(self, name: str, now: float) -> int:
        """Stop every replica of this key's service ``name``; the name stays this key's."""
        op = self._new_owner_op("undeploy", ServiceId(name, self.identity.public_key))
        op.change = {"undeployed": True}
        self._read_for(op, now)
        return op.op_id

    def status(self, service: ServiceId, now: float) -> int:
        """Ask the service's group for its state; emits :class:`StatusFinished`."""
        query_id = self._new_id()
        op = _StatusOp(query_id, service, now + self.config.query_timeout_s)
        self._status_ops[query_id] = op
        record = self.records.get(service.key)
        if record is not None:
            self._ask_status(op, record.group, now)
        lookup = self.overlay.lookup(service.key, now)
        self._status_by_lookup[lookup] = op
        self.set_timer(("status", query_id), op.deadline)
        return query_id

    def list_services(self, owner: bytes, now: float) -> int:
        """The names of ``owner``'s services (its list record); emits :class:`ServicesListed`."""
        query_id = self._new_id()
        read = self.persistence.get_record(record_key(owner, SERVICES_LIST_NAME), now)
        self._list_reads[read] = (query_id, owner)
        return query_id

    def _ask_status(self, op: _StatusOp, members: list[Contact], now: float) -> None:
        for member in members:
            if member.node_id in op.asked:
                continue
            op.asked.add(member.node_id)
            if member.node_id == self.node_id:
                self._on_query(self.contact.address, ServiceQuery(op.query_id, op.service.key), now)
                continue
            self.send(self._fresh_contact(member).address, ServiceQuery(op.query_id, op.service.key))

    def _on_status_reply(self, src: Address, msg: ServiceReport, now: float) -> None:
        op = self._status_ops.get(msg.query_id)
        if op is None or msg.service != op.service.key:
            self.dropped["unexpected_status"] += 1
            return
        if msg.managing:
            del self._status_ops[msg.query_id]
            self.cancel_timer(("status", msg.query_id))
            op.best = msg
            self._finish_status(op, "")
            return
        if op.best is None or msg.version > op.best.version:
            op.best = msg
        if msg.manager is not None:
            self._ask_status(op, [msg.manager], now)

    def _finish_status(self, op: _StatusOp, reason: str) -> None:
        self.emit(StatusFinished(op.query_id, str(op.service), op.best, reason))

    def _new_id(self) -> int:
        self._next_op += 1
        return self._next_op

    def _new_owner_op(self, action: str, service: ServiceId) -> _OwnerOp:
        op = _OwnerOp(self._new_id(), action, service)
        self._owner_ops[op.op_id] = op
        return op

    def _numeric_attributes(self, manifest: Manifest) -> list[str]:
        """The attributes whose largest value tells whether any node could run ``manifest``."""
        names = {"cpu", "memory", "disk"}
        for requirement in (manifest.resources.requirements, manifest.placement.constraints):
            if requirement is not None:
                names |= requirement.attributes()
        return sorted(names)

    def _store_bundle(self, op: _OwnerOp, now: float) -> None:
        assert op.bundle is not None
        op.phase = "storing"
        query = self.persistence.put_blob(op.bundle.data, now, keep=True)
        op.waiting = {query}
        self._op_of[query] = op

    def _read_for(self, op: _OwnerOp, now: float) -> None:
        op.phase = "reading"
        read = self.persistence.quorum_read(op.service.key, now)
        op.waiting = {read}
        self._op_of[read] = op

    def _owner_step(self, op: _OwnerOp, event: Any, now: float) -> None:
        op.waiting.discard(event.query_id)
        if isinstance(event, AggregateFinished):
            if event.ok and isinstance(event.value, int | float) and event.attribute:
                op.largest[event.attribute] = event.value
            if op.waiting:
                return
            assert op.manifest is not None
            placement = op.manifest.placement
            reason = impossible_reason(_constraints(op.manifest, placement), op.manifest.demand(), op.largest)
            if reason is not None:
                self._finish_owner(op, False, reason)
                return
            self._store_bundle(op, now)
        elif isinstance(event, BlobStored):
            if not event.ok:
                self._finish_owner(op, False, f"the bundle could not be stored: {event.reason}")
                return
            assert op.bundle is not None and op.manifest is not None
            op.spec = ServiceSpec(op.manifest.name, op.manifest_text,
                                  event.blob_id.to_bytes(20, "big"), op.bundle.public_key, op.bundle.signature,
                                  **op.change)
            self._read_for(op, now)
        elif isinstance(event, QuorumFinished):
            self._on_owner_quorum(op, event, now)
        elif isinstance(event, RecordFound):
            names = _listed(event.item)
            if op.service.name not in names:
                names = sorted({*names, op.service.name})[:MAX_LISTED]
                sequence = event.item.sequence + 1 if event.item is not None else 1
                _, item = sign_record(self.identity, SERVICES_LIST_NAME, wire.encode(ServicesList(names)), sequence)
                query = self.persistence.put_record(item, now)
                op.waiting = {query}
                self._op_of[query] = op
                return
            self._finish_owner(op, True, "")
        elif isinstance(event, RecordStored):
            self._finish_owner(op, True, "")

    def _on_owner_quorum(self, op: _OwnerOp, event: QuorumFinished, now: float) -> None:
        if op.phase == "reading":
            if not event.ok:
                self._finish_owner(op, False, f"the service's record could not be read: {event.reason}")
                return
            current = None
            if event.item is not None:
                try:
                    current = wire.decode(event.item.value, len(event.item.value) + 1)
                except wire.WireError:
                    current = None
            if op.action != "deploy":
                if not isinstance(current, ServiceSpec):
                    self._finish_owner(op, False, f"no service {op.service.name} owned by this key")
                    return
                spec = dataclasses.replace(current, **op.change)
            else:
                assert op.spec is not None
                spec = op.spec
            op.phase = "writing"
            write = self.persistence.quorum_cas(self.identity, op.service.record_name, event.version,
                                                wire.encode(spec), now)
            op.spec = spec
            op.waiting = {write}
            self._op_of[write] = op
            return
        if not event.ok:
            self._finish_owner(op, False, f"the service's record could not be written: {event.reason}")
            return
        op.version = event.version
        if op.action == "deploy":
            op.phase = "listing"
            read = self.persistence.get_record(record_key(self.identity.public_key, SERVICES_LIST_NAME), now)
            op.waiting = {read}
            self._op_of[read] = op
            return
        self._finish_owner(op, True, "")

    def _finish_owner(self, op: _OwnerOp, ok: bool, reason: str) -> None:
        self._owner_ops.pop(op.op_id, None)
        for query in op.waiting:
            self._op_of.pop(query, None)
        self.emit(DeployFinished(op.op_id, str(op.service), op.action, ok, op.version, reason))

    def _on_list_read(self, event: RecordFound, now: float) -> None:
        query_id, owner = self._list_reads.pop(event.query_id)
        self.emit(ServicesListed(query_id, owner, _listed(event.item)))


def _listed(item: Any) -> list[str]:
    if item is None:
        return []
    try:
        listed = wire.decode(item.value, len(item.value) + 1)
    except wire.WireError:
        return []
    return list(listed.names)[:MAX_LISTED] if isinstance(listed, ServicesList) else []
