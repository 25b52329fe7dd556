"""The host's side of service deployment: the reports of the replicas a node runs for services.

A mixin of the :class:`~p2pdeploy.collective.deployment.Deployment` layer. A node that runs
replicas a service's manager started reports them (all of them, with their states) to the
manager it knows, at once on a change and every ``report_interval_s``; the manager's ack names
who manages and the record's group, and releases the finished replicas it no longer wants. A
host whose manager is declared dead, or does not ack ``report_misses`` reports, reports to the
next member of the group. Every state change of such a replica is published on the service's
topic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.collective.deployment_messages import (
    MAX_REPORTED,
    ReplicaEntry,
    ReplicaReport,
    ReportAck,
    ServiceId,
)
from p2pdeploy.collective.events import ReplicaChanged
from p2pdeploy.collective.pubsub import PubSub
from p2pdeploy.core import Address
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaStateChanged
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.swim import Liveness
from p2pdeploy.resource.protocol import RemoteControl


@dataclass(slots=True)
class _Hosted:
    """A service this node hosts replicas of: whom it reports to."""

    manager: Contact
    group: list[Contact] = field(default_factory=list)
    unacked: int = 0
    final_sent: bool = False


class HostReports:
    """What a node reports of the replicas it runs for services (a mixin of the Deployment layer)."""

    node_id: int
    overlay: Kademlia
    pubsub: PubSub | None
    remote: RemoteControl | None
    host: ReplicaHost | None
    config: Any
    counters: Any
    dropped: Any
    hosting: dict[int, _Hosted]
    send: Callable[[Address, Any], None]
    _arm: Callable[[float], None]
    _watch: Callable[[Contact, float], None]
    _liveness: Callable[[int], Liveness]
    _fresh_contact: Callable[[Contact], Contact]
    _fresh_group: Callable[[list[Contact]], list[Contact]]
    _member_at: Callable[[list[Contact], Address], Contact | None]

    def _publish_replica(self, event: ReplicaStateChanged, now: float) -> None:
        managed = self.remote.managed.get(event.replica_id) if self.remote is not None else None
        if managed is None or self.pubsub is None:
            return
        service = ServiceId(managed.service_name, managed.owner)
        changed = ReplicaChanged.from_supervisor(event, str(service), self.node_id)
        attributes = changed.attributes()
        attributes["reason"] = attributes["reason"][:300]
        try:
            self.pubsub.publish(service.topic, attributes, now)
        except ValueError:
            self.dropped["replica_change_unpublishable"] += 1

    def _managed_replicas(self) -> dict[str, Any]:
        return {} if self.remote is None else self.remote.managed_replicas()

    def _report(self, key: int, now: float, *, periodic: bool = False) -> None:
        """Tell ``key``'s manager what this node runs of it (all of it)."""
        host = self.host
        managed = {rid: m for rid, m in self._managed_replicas().items() if m.service_key == key}
        hosted = self.hosting.get(key)
        if hosted is None:
            if not managed:
                return
            first = next(iter(managed.values()))
            hosted = self.hosting[key] = _Hosted(Contact(first.manager_id, first.manager))
            self._watch(hosted.manager, now)
        entries = []
        for replica_id in sorted(managed)[:MAX_REPORTED]:
            status = host.status(replica_id) if host is not None else None
            supervisor = host.supervisor(replica_id) if host is not None else None
            if status is None:
                continue
            entries.append(ReplicaEntry(replica_id, status.state.value, status.reason[:200], status.healthy,
                                        status.run, supervisor.digest if supervisor is not None else b""))
        if not entries:
            if hosted.final_sent:
                del self.hosting[key]
                return
            hosted.final_sent = True
        else:
            hosted.final_sent = False
        if periodic:
            hosted.unacked += 1
            if hosted.unacked > self.config.report_misses:
                self._next_manager(key, hosted)  # its reports were not acknowledged
        report = ReplicaReport(key, self.node_id, entries)
        for address in self._addresses_of(hosted.manager):
            self.send(address, report)
        self._arm(now)

    def _addresses_of(self, contact: Contact) -> list[Address]:
        """Where ``contact`` may listen: the address the routing table knows and, when it differs,
        the one this node was told (an ack names the manager as the member that sent it knows it;
        a node that restarted listens elsewhere, and a table that has not heard from it since
        still holds the old address, so both are tried until the table has checked the new one)."""
        return list(dict.fromkeys([self._fresh_contact(contact).address, contact.address]))

    def _next_manager(self, key: int, hosted: _Hosted) -> None:
        """Report to the next member of the group (closest first, round and round), skipping
        those held dead; before any ack told the group, to the nodes this one knows closest to
        the key (a member that is not the manager answers with who is)."""
        members = sorted(self._fresh_group(hosted.group) or self.overlay.closest_known(key), key=lambda c: c.node_id ^ key)
        current = hosted.manager.node_id ^ key
        later = [m for m in members if (m.node_id ^ key) > current] + [m for m in members if (m.node_id ^ key) <= current]
        candidates = [m for m in later if m.node_id != hosted.manager.node_id
                      and self._liveness(m.node_id) is not Liveness.dead]
        if candidates:
            hosted.manager = candidates[0]
            hosted.unacked = 0
            self.counters["manager_switches"] += 1

    def _on_ack(self, src: Address, msg: ReportAck, now: float) -> None:
        hosted = self.hosting.get(msg.service)
        if hosted is None:
            self.dropped["ack_for_unknown_service"] += 1
            return
        if self._member_at(hosted.group or [hosted.manager], src) is None:
            self.dropped["ack_from_outside_the_group"] += 1
            return
        hosted.unacked = 0
        if msg.group:
            hosted.group = list(msg.group)[:16]
        managed = self._managed_replicas()
        for replica_id in msg.release[:MAX_REPORTED]:
            entry = managed.get(replica_id)
            status = self.host.status(replica_id) if self.host is not None else None
            if entry is not None and entry.service_key == msg.service and status is not None \
                    and status.state.value == "stopped" and self.host is not None:
                self.host.forget(replica_id, now)
        if self._fresh_contact(msg.manager).address != msg.manager.address:
            self.overlay.heard(msg.manager, now)  # the table challenges it there, and learns the address once proved
        moved = msg.manager.node_id != hosted.manager.node_id
        hosted.manager = msg.manager  # (or the address it listens at now)
        if moved:
            self._watch(msg.manager, now)
            self._report(msg.service, now)
