"""Service deployment: service managers, the deployer, the allocator and self-healing.

A service ``NAME@OWNER`` is its owner's quorum record ``service/NAME``
(:mod:`p2pdeploy.collective.deployment_messages`): the signed desired state, linearizable, its
version the service's generation. The record's group (the nodes closest to its key when it was
first written) hold it; the closest of them that this node's failure detector does not hold
dead is the service's *manager*. Every group member decides that alike from the same group and
its own detector, so when the manager dies the next closest takes over within the detector's
verdict, with the desired state it already holds (and reads again from the quorum). A node runs
one :class:`ServiceManager` per service it manages, as keyed children of this layer.

A manager is a level-triggered reconciler (Kubernetes' controllers, Nomad's scheduler loop):
every ``tick_s`` it compares what the record wants with what the hosts report, and acts:

- the **deployer** chooses the replica count (:mod:`p2pdeploy.collective.deployer`): fixed, or
  the fewest whose availability, from the candidates' own uptime history, meets the target;
- the **allocator** (:mod:`p2pdeploy.collective.allocator`) places missing replicas on nodes the
  prospector finds, spread over owners and attributes, within every node's limits; a start is
  a signed request of the remote protocol naming the bundle by blob id; a refused start tries
  the next candidate;
- **self-healing**: a replica whose host the detector declares dead, or that failed or stays
  unhealthy for ``unhealthy_grace_s``, is replaced elsewhere; a host only *suspected* is not
  (a pause must not make replicas flap); a host that comes back reports its replicas again, and
  the surplus is stopped so the desired count holds;
- a new bundle is rolled out make-before-break: the old replicas stop once as many new ones run.

Hosts report their managed replicas (``ReplicaReport``) on every change and every
``report_interval_s`` to the manager they know; its ``ReportAck`` names the manager and the
group, so a host whose manager dies (its detector's verdict, or acks missing) reports to the
next member, and a new manager learns where the replicas are within one report interval (it
places nothing for ``takeover_grace_s`` after it takes over, so it does not double them).

Every decision is a :class:`~p2pdeploy.collective.deployment_messages.Decision`, emitted for the
driver and published on the service's topic with its reason. The owner's side of the API
(:meth:`Deployment.deploy`, :meth:`~Deployment.scale`, :meth:`~Deployment.undeploy`) writes the
record; :meth:`Deployment.status` asks the group.

The layer is in four modules: this one (the records, who manages, the reconciler, the reports a
manager receives), :mod:`~p2pdeploy.collective.service_manager` (what a manager keeps of a
service, and the reconciler's pure rules), :mod:`~p2pdeploy.collective.deployment_hosts` (what a
host reports) and :mod:`~p2pdeploy.collective.deployment_owner` (the owner's API and status
queries); the messages are in :mod:`~p2pdeploy.collective.deployment_messages`.

Not here: autoscaling on load, rebalancing on join (self-tuning, self-configuration), and
delegation of a service to other keys: only its owner's key can write its record.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from p2pdeploy import wire
from p2pdeploy.collective.allocator import Offer, allocate
from p2pdeploy.collective.deployer import replica_count
from p2pdeploy.collective.deployment_hosts import HostReports, _Hosted
from p2pdeploy.collective.deployment_messages import (
    MAX_REPORTED,
    SERVICE_RECORD_PREFIX,
    Decision,
    ManagerAlive,
    ManagerHandoff,
    ReplicaReport,
    ReportAck,
    ServiceId,
    ServiceIdError,
    ServiceQuery,
    ServiceReport,
    ServiceSpec,
)
from p2pdeploy.collective.deployment_owner import (
    MAX_LISTED,
    SERVICES_LIST_NAME,
    DeployFinished,
    OwnerOperations,
    ServicesListed,
    StatusFinished,
    _OwnerOp,
    _StatusOp,
)
from p2pdeploy.collective.persistence import Persistence
from p2pdeploy.collective.persistence_messages import (
    BlobStored,
    QuorumFinished,
    QuorumValueAccepted,
    RecordFound,
    RecordStored,
)
from p2pdeploy.collective.prospector import Prospector
from p2pdeploy.collective.prospector_queries import AggregateFinished, ProspectFinished
from p2pdeploy.collective.pubsub import PubSub
from p2pdeploy.collective.service_manager import (
    LIVE_STATES,
    Placed,
    ServiceManager,
    _combined,
    _constraints,
    _removal_order,
    _short,
    _why_there,
)
from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaStateChanged
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, LookupFinished
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.swim import FailureDetector, Liveness, PeerDeclaredDead, PeerRecovered
from p2pdeploy.resource.bundle import SignedBundle
from p2pdeploy.resource.manifest import Manifest, ManifestError
from p2pdeploy.resource.protocol import (
    Refused,
    RemoteClient,
    RemoteControl,
    RequestAnswered,
    RequestTimedOut,
)

#: The watcher name this layer uses with the failure detector.
WATCHER = "deployment"


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """The deployment layer's knobs; the defaults suit a loopback or LAN community."""

    #: Seconds between two reconciliations of every managed service.
    tick_s: float = 1.0
    #: Seconds between two reports of a host to a manager (a change is reported at once).
    report_interval_s: float = 2.0
    #: Reports without an ack before a host reports to the next member of the group.
    report_misses: int = 3
    #: After taking a service over, a manager waits this long for the hosts' reports before it
    #: places anything (so it does not double replicas it has not heard of yet).
    takeover_grace_s: float = 3.0
    #: Seconds between two quorum reads of a managed service's record (a missed write is caught).
    record_refresh_s: float = 30.0
    #: A replica failed, or running but unhealthy, this long is replaced.
    unhealthy_grace_s: float = 10.0
    #: After replicas failed one after another, the next placement waits this long, doubled with
    #: every further failure up to ``failure_backoff_max_s`` (a bundle that cannot run on any node
    #: does not start a replica a second); a replica that runs healthy resets it.
    failure_backoff_s: float = 5.0
    failure_backoff_max_s: float = 300.0
    #: A start not reported by its host within this is given up.
    start_timeout_s: float = 60.0
    #: A node that refused a start is not asked again for this long.
    refused_retry_s: float = 60.0
    #: While replicas are missing and no node has room, seconds between two searches.
    pending_retry_s: float = 5.0
    #: Seconds between two searches for new nodes of a ``mode = "every"`` service, and between two
    #: recomputations of an availability target's count.
    refresh_candidates_s: float = 30.0
    #: The availability assumed of a node that advertises none.
    unknown_availability: float = 0.9
    #: How long a status query waits for the manager's answer.
    query_timeout_s: float = 3.0
    #: Service records this node keeps track of (as a member of their groups).
    max_records: int = 10_000
    #: A member of a record's group suspected this long counts as gone when choosing the manager
    #: (a detector slowed by its own poor health may take minutes to convict; the service would
    #: stay unmanaged meanwhile). Hosts are still replaced only on a verdict.
    manager_suspect_s: float = 20.0
    #: A member that told it manages (``ManagerAlive``, every ``report_interval_s``) and has been
    #: silent for this many intervals counts as gone when choosing the manager; so does one never
    #: heard from this many intervals after this node took up the record (it started, or learned it).
    manager_silence_reports: int = 4

    def __post_init__(self) -> None:
        require_positive(self, "deployment.", "tick_s", "report_interval_s", "takeover_grace_s", "record_refresh_s",
                         "start_timeout_s", "refused_retry_s", "pending_retry_s", "refresh_candidates_s",
                         "query_timeout_s", "failure_backoff_s", "failure_backoff_max_s", "manager_suspect_s")
        require_at_least(self, "deployment.", 0, "unhealthy_grace_s")
        require_at_least(self, "deployment.", 1, "report_misses", "max_records", "manager_silence_reports")
        if not 0 <= self.unknown_availability <= 1:
            raise ValueError(f"deployment.unknown_availability must be between 0 and 1 (got {self.unknown_availability})")

    @property
    def report_timeout_s(self) -> float:
        """A replica whose host has not reported it this long, while the host is not held alive, is lost."""
        return self.report_interval_s * (self.report_misses + 2)


@dataclass(slots=True)
class _Record:
    service: ServiceId
    group: list[Contact]
    item_sequence: int
    value: bytes


class Deployment(OwnerOperations, HostReports, Protocol):
    """Service managers for the services whose records this node holds, the host side of the
    reports, and the owner's API; see the module docstring."""

    handles = (ReplicaReport, ReportAck, ServiceQuery, ServiceReport, ManagerHandoff, ManagerAlive)
    consumes = (QuorumValueAccepted, QuorumFinished, BlobStored, RecordFound, RecordStored, ProspectFinished,
                AggregateFinished, RequestAnswered, RequestTimedOut, PeerDeclaredDead, PeerRecovered,
                ReplicaStateChanged, LookupFinished)

    def __init__(
        self,
        identity: Identity,
        address: Address,
        overlay: Kademlia,
        persistence: Persistence,
        prospector: Prospector,
        client: RemoteClient,
        rng: Rng,
        now: float,
        *,
        pubsub: PubSub | None = None,
        detector: FailureDetector | None = None,
        remote: RemoteControl | None = None,
        host: ReplicaHost | None = None,
        config: DeploymentConfig | None = None,
    ) -> None:
        super().__init__()
        self.identity = identity
        self.node_id = identity.node_id
        self.contact = Contact(self.node_id, address)
        self.overlay = overlay
        self.persistence = persistence
        self.prospector = prospector
        self.client = client
        self.rng = rng
        self.pubsub = pubsub
        self.detector = detector
        self.remote = remote
        self.host = host
        self.config = config or DeploymentConfig()
        self.counters: Counter[str] = Counter()
        #: Service records this node holds as a member of their group, by key.
        self.records: dict[int, _Record] = {}
        #: The services this node manages, by key.
        self.managers: dict[int, ServiceManager] = {}
        #: The services this node hosts replicas of, by key.
        self.hosting: dict[int, _Hosted] = {}
        self._owner_ops: dict[int, _OwnerOp] = {}
        self._op_of: dict[int, _OwnerOp] = {}  # an underlying query id -> the owner's op
        self._status_ops: dict[int, _StatusOp] = {}
        self._status_by_lookup: dict[int, _StatusOp] = {}
        self._requests: dict[int, tuple[int, str]] = {}  # remote request id -> (service key, replica id)
        self._prospects: dict[int, int] = {}  # prospect query id -> service key
        self._reads: dict[int, int] = {}  # quorum read id -> service key
        self._list_reads: dict[int, tuple[int, bytes]] = {}  # record read id -> (ServicesListed query id, owner)
        self._next_op = 1
        #: (service key, member id) -> when that member last said it manages the service.
        self._heard_manager: dict[tuple[int, int], float] = {}
        #: Service key -> when this run of the node took up its record: a member never heard
        #: managing is given until ``manager_silence_reports`` intervals after it.
        self._record_since: dict[int, float] = {}
        self._load_records(now)

    def _arm(self, now: float) -> None:
        """The timers run only while there is something to manage or report (an idle node, as in
        a simulation of the layers below, pays nothing)."""
        if self.records and self.timer_deadline("tick") is None:
            self.set_timer("tick", now + self.rng.uniform(0, self.config.tick_s))
        if (self.hosting or self._managed_replicas()) and self.timer_deadline("report") is None:
            self.set_timer("report", now + self.config.report_interval_s)

    # -- read-only views -------------------------------------------------------------------
    def managed(self) -> list[ServiceManager]:
        return list(self.managers.values())

    def report_of(self, manager: ServiceManager, query_id: int = 0) -> ServiceReport:
        return ServiceReport(
            query_id, manager.key, True, self.contact, manager.version, manager.desired, manager.desired_reason,
            [p.view() for p in list(manager.replicas.values())[:MAX_REPORTED]],
            [f"{d.at_s:.1f} {d}" for d in manager.decisions], manager.pending or manager.invalid,
        )

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        if isinstance(msg, ReplicaReport):
            self._on_report(src, msg, now)
        elif isinstance(msg, ReportAck):
            self._on_ack(src, msg, now)
        elif isinstance(msg, ServiceQuery):
            self._on_query(src, msg, now)
        elif isinstance(msg, ServiceReport):
            self._on_status_reply(src, msg, now)
        elif isinstance(msg, ManagerHandoff):
            self._on_handoff(src, msg, now)
        elif isinstance(msg, ManagerAlive):
            record = self.records.get(msg.service)
            member = self._member_at(record.group, src) if record is not None else None
            if member is None:
                self.dropped["manager_alive_from_outside_the_group"] += 1
                return
            self._heard_manager[(msg.service, member.node_id)] = now

    def handle_event(self, event: Any, now: float) -> bool:
        if isinstance(event, QuorumValueAccepted):
            return self._on_accepted(event, now)
        if isinstance(event, ReplicaStateChanged):
            if self.remote is not None and event.replica_id in self.remote.managed:
                self._report(self.remote.managed[event.replica_id].service_key, now)
                self._publish_replica(event, now)
            return False
        if isinstance(event, PeerDeclaredDead | PeerRecovered):
            self._on_liveness(event, now)
            return False
        if isinstance(event, RequestAnswered | RequestTimedOut):
            return self._on_remote_answer(event, now)
        if isinstance(event, ProspectFinished):
            key = self._prospects.pop(event.query_id, None)
            if key is None:
                return False
            manager = self.managers.get(key)
            if manager is not None and manager.prospecting == event.query_id:
                manager.prospecting = None
                self._on_candidates(manager, event, now)
            return True
        if isinstance(event, QuorumFinished):
            return self._on_quorum(event, now)
        if isinstance(event, LookupFinished):
            op = self._status_by_lookup.pop(event.query_id, None)
            if op is None:
                return False
            if op.query_id in self._status_ops:
                self._ask_status(op, event.closest[:5], now)
            return True
        if isinstance(event, RecordFound) and event.query_id in self._list_reads:
            self._on_list_read(event, now)
            return True
        if isinstance(event, AggregateFinished | BlobStored | RecordFound | RecordStored):
            op = self._op_of.pop(event.query_id, None)
            if op is None:
                return False
            self._owner_step(op, event, now)
            return True
        return False

    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "tick":
            self._tick(now)
            if self.records:
                self.set_timer("tick", now + self.config.tick_s)
        elif name == "report":
            for key in dict.fromkeys([*self.hosting, *(m.service_key for m in self._managed_replicas().values())]):
                self._report(key, now, periodic=True)  # (it arms the next report while there is one)
        elif isinstance(name, tuple) and name[0] == "status":
            op = self._status_ops.pop(name[1], None)
            if op is not None:
                self._finish_status(op, "no member of the service's group answered" if op.best is None else "")

    # -- the group's records and who manages -----------------------------------------------
    def _load_records(self, now: float) -> None:
        store = self.persistence.store
        for key in store.acceptor_keys():
            state = store.read_acceptor(key)
            if state is not None and state.item is not None:
                self._learn_record(key, state.item, state.group, now)

    def _on_accepted(self, event: QuorumValueAccepted, now: float) -> bool:
        if not event.item.name.startswith(SERVICE_RECORD_PREFIX):
            return False
        new = event.key not in self.records
        self._learn_record(event.key, event.item, event.group, now)
        manager = self.managers.get(event.key)
        if manager is not None:
            self._load_spec(manager, event.item.sequence, event.item.value, now)
        # the first version of a service never heard of: no replica of it runs anywhere yet
        self._tick_service(event.key, now, fresh=new and event.item.sequence == 1)
        return True

    def _learn_record(self, key: int, item: Any, group: list[Contact], now: float) -> None:
        if not item.name.startswith(SERVICE_RECORD_PREFIX):
            return
        try:
            service = ServiceId(item.name[len(SERVICE_RECORD_PREFIX):].decode(), item.public_key)
        except (ServiceIdError, UnicodeDecodeError):
            self.dropped["service_record_name"] += 1
            return
        if service.key != key:
            self.dropped["service_record_key"] += 1
            return
        known = self.records.get(key)
        if known is None and len(self.records) >= self.config.max_records:
            self.dropped["service_records_full"] += 1
            return
        if known is not None and known.item_sequence > item.sequence:
            return
        self.records[key] = _Record(service, list(group), item.sequence, item.value)
        self._record_since.setdefault(key, now)
        for member in group:
            self._watch(member, now)
        self._arm(now)

    def _manager_of(self, key: int, group: list[Contact], now: float) -> Contact | None:
        """The closest member of ``group`` that this node does not hold dead (nor has suspected
        for ``manager_suspect_s``), nor has been without its ``ManagerAlive`` for
        ``manager_silence_reports`` intervals (since the last one, or since this node took up the
        record). Silence is evidence of its own: a node that restarts watches the members anew,
        alive until its detector probes them, and with a hundred peers watched at a WAN period
        that takes minutes; a closer member down all along kept the service unmanaged meanwhile."""
        silence_s = self.config.report_interval_s * self.config.manager_silence_reports
        for member in sorted(group, key=lambda c: c.node_id ^ key):
            if member.node_id == self.node_id:
                return self.contact
            liveness = self._liveness(member.node_id)
            if liveness is Liveness.dead:
                continue
            heard = self._heard_manager.get((key, member.node_id), self._record_since.get(key))
            if heard is not None and now - heard > silence_s:
                continue  # it managed and has been silent since, or it never told it manages
            if liveness is Liveness.suspect and self.detector is not None:
                since = self.detector.since(member.node_id)
                if since is not None and now - since >= self.config.manager_suspect_s:
                    continue
            return self._fresh_contact(member)
        return None

    def _fresh_contact(self, contact: Contact) -> Contact:
        """``contact`` at the address this node's routing table knows now: a record's group and a
        host's manager are remembered with the addresses they had, and a node that restarted may
        listen elsewhere (the table's contacts proved their address)."""
        known = self.overlay.table.get(contact.node_id)
        return known if known is not None else contact

    def _fresh_group(self, group: list[Contact]) -> list[Contact]:
        return [self._fresh_contact(member) for member in group]

    def _member_at(self, members: list[Contact], src: Address) -> Contact | None:
        """The one of ``members`` that ``src`` is (at the address remembered or the one the
        routing table knows now); None: a message from outside them."""
        return next((m for m in members if m.address == src or self._fresh_contact(m).address == src), None)

    def _liveness(self, node_id: int) -> Liveness:
        if node_id == self.node_id:
            return Liveness.alive
        if self.detector is None:
            return Liveness.unknown
        return self.detector.state(node_id)

    def _watch(self, contact: Contact, now: float) -> None:
        detector = self.detector
        if detector is None or contact.node_id == self.node_id:
            return
        try:
            detector.watch(contact.node_id, contact.address, now, by=WATCHER)
        except RuntimeError:
            self.dropped["watch_list_full"] += 1

    def _tick(self, now: float) -> None:
        for key in list(self.records):
            self._tick_service(key, now)

    def _tick_service(self, key: int, now: float, *, fresh: bool = False) -> None:
        record = self.records.get(key)
        if record is None:
            return
        manager_contact = self._manager_of(key, record.group, now)
        manager = self.managers.get(key)
        if manager_contact is None or manager_contact.node_id != self.node_id:
            if manager is not None:
                del self.managers[key]
                self._decide(manager, "manager_moved", f"to {_short(manager_contact)}", now)
                if manager_contact is not None:  # it is alive (a closer member came back): hand over
                    replicas = [p.view() for p in manager.replicas.values() if p.counts][:MAX_REPORTED]
                    self.send(manager_contact.address, ManagerHandoff(key, replicas))
            return
        if manager is None:
            manager = self._take_over(key, record, now, fresh)
        self._reconcile(manager, now)

    def _take_over(self, key: int, record: _Record, now: float, fresh: bool) -> ServiceManager:
        manager = ServiceManager(record.service, key, list(record.group))
        # A service just created has no replicas anywhere yet; otherwise hosts may run some, and
        # they report within a report interval (or the previous manager hands them over).
        manager.grace_until = now if fresh else now + self.config.takeover_grace_s
        self.managers[key] = manager
        self._load_spec(manager, record.item_sequence, record.value, now)
        self._decide(manager, "manager", f"{_short(self.contact)} manages version {manager.version}", now)
        self._refresh(manager, now)
        return manager

    def _load_spec(self, manager: ServiceManager, version: int, value: bytes, now: float) -> None:
        if version < manager.version or (version == manager.version and manager.spec is not None):
            return
        manager.version = version
        try:
            spec = wire.decode(value, len(value) + 1)
            if not isinstance(spec, ServiceSpec) or spec.name != manager.service.name:
                raise ValueError("not a service record")
            manifest = Manifest.parse(spec.manifest)
        except (wire.WireError, ValueError, ManifestError) as exc:
            manager.invalid = f"version {version} is not a valid service record: {exc}"
            manager.spec = None
            return
        manager.invalid = ""
        manager.spec, manager.manifest = spec, manifest
        manager.last_candidates_s = -math.inf
        placement = manager.placement
        if spec.undeployed:
            manager.desired, manager.desired_reason = 0, "undeployed"
        elif placement.mode == "count" and placement.replicas is not None:
            manager.desired, manager.desired_reason = placement.replicas, f"fixed: {placement.replicas} replicas"
        elif not manager.desired:
            manager.desired = placement.min_replicas
            manager.desired_reason = f"{placement.min_replicas} (min_replicas) until candidates are known"

    def _refresh(self, manager: ServiceManager, now: float) -> None:
        if manager.refreshing is not None:
            return
        read = self.persistence.quorum_read(manager.key, now)
        manager.refreshing = read
        self._reads[read] = manager.key
        manager.next_refresh_s = now + self.config.record_refresh_s

    # -- the reconciler --------------------------------------------------------------------
    def _reconcile(self, manager: ServiceManager, now: float) -> None:
        c = self.config
        if now >= manager.next_alive_s:
            manager.next_alive_s = now + c.report_interval_s
            for member in manager.group:
                if member.node_id != self.node_id:
                    self.send(self._fresh_contact(member).address, ManagerAlive(manager.key))
        if now >= manager.next_refresh_s:
            self._refresh(manager, now)
        spec = manager.spec
        if spec is None:
            return
        for placed in list(manager.replicas.values()):
            self._check_replica(manager, placed, now)
        live = manager.counted()
        current = [p for p in live if p.bundle_blob == spec.bundle_blob]
        outdated = [p for p in live if p.bundle_blob != spec.bundle_blob]
        if spec.undeployed:
            for placed in live:
                self._stop(manager, placed, "undeployed", now)
            return
        desired = manager.desired
        if now < manager.grace_until:
            return
        placement = manager.placement
        refresh_due = placement.mode == "every" or placement.availability is not None
        need = desired - len(current)
        if need > 0 and manager.offers and now >= manager.next_search_s \
                and now - manager.last_candidates_s < c.refresh_candidates_s * 4:
            need -= len(self._place(manager, manager.offers, need, now))
        if manager.prospecting is None and now >= manager.next_search_s and (
                need > 0 or (refresh_due and now - manager.last_candidates_s >= c.refresh_candidates_s)):
            self._search(manager, len(live), now)
        if len(current) > desired:
            for placed in _removal_order(current)[: len(current) - desired]:
                self._stop(manager, placed, f"surplus: {len(current)} replicas run, {desired} wanted", now)
        running = sum(1 for p in current if p.state == "running" and p.healthy)
        if outdated and running >= desired:
            for placed in outdated:
                self._stop(manager, placed, f"replaced by version {manager.version}", now)
        elif outdated and manager.pending and len(current) < desired and \
                not any(p.stopping for p in manager.replicas.values()):
            # no node is free beside the old replicas: one old one makes room (break before make,
            # one at a time, as a rolling update with maxUnavailable 1)
            oldest = min(outdated, key=lambda p: (p.since_s, p.replica_id))
            self._stop(manager, oldest, f"making room for version {manager.version}: no other node is free", now)

    def _check_replica(self, manager: ServiceManager, placed: Placed, now: float) -> None:
        """Drop what is lost (its host dead, silent, or the replica failed), stop what failed."""
        c = self.config
        if placed.state in ("stopped",):
            del manager.replicas[placed.replica_id]
            return
        if placed.stopping and placed.state in LIVE_STATES and now - placed.stop_sent_s >= c.report_timeout_s:
            self._send_stop(manager, placed, now)  # its host still runs it: the stop was lost (a partition, say)
        liveness = self._liveness(placed.host.node_id)
        lost = ""
        if liveness is Liveness.dead:
            lost = f"host {_short(placed.host)} declared dead"
        elif placed.state == "requested" and now - placed.since_s > c.start_timeout_s:
            lost = f"host {_short(placed.host)} did not report it within {c.start_timeout_s:g} s"
        elif placed.state != "requested" and now - placed.reported_s > c.report_timeout_s:
            if liveness is not Liveness.alive:
                lost = f"host {_short(placed.host)} stopped reporting"
            elif not placed.asking and placed.confirmed:
                # alive but silent about it (it restarted before anyone held it dead, say): ask
                placed.asking = True
                self._ask(manager, placed, self._fresh_contact(placed.host), now)
        if lost:
            del manager.replicas[placed.replica_id]
            if placed.live:
                manager.lost_at.append(now)
                self._decide(manager, "lost", lost, now, placed)
            return
        if placed.state in ("failed",) or (placed.state == "running" and not placed.healthy):
            if now - placed.fine_s >= c.unhealthy_grace_s and not placed.stopping:
                manager.lost_at.append(now)
                why = f"{placed.state}{': ' + placed.reason if placed.reason else ''}"
                self._stop(manager, placed, f"{why} for {now - placed.fine_s:.0f} s", now)
                # the node may be the cause: try others first; and if every replica fails, back off
                manager.refused[placed.host.node_id] = now + c.refused_retry_s
                manager.failures += 1
                backoff = min(c.failure_backoff_s * 2 ** (manager.failures - 1), c.failure_backoff_max_s)
                manager.next_search_s = max(manager.next_search_s, now + backoff)
                manager.pending = (f"replicas keep failing ({manager.failures} in a row, the last {why}); "
                                   f"the next placement in {backoff:g} s")
        else:
            placed.fine_s = now
            if placed.state == "running" and manager.failures and now - placed.since_s >= 2 * c.unhealthy_grace_s:
                manager.failures = 0  # one has run healthy a while: the bundle is fine
                manager.next_search_s = min(manager.next_search_s, now)

    def _search(self, manager: ServiceManager, live: int, now: float) -> None:
        manifest = manager.manifest
        assert manifest is not None
        placement = manager.placement
        requirement = _combined(manifest, placement.constraints)
        wanted = 64 if placement.mode == "every" else max(manager.desired, placement.max_replicas or 0) + live + 4
        query = self.prospector.prospect(requirement, min(wanted, 64), now)
        manager.prospecting = query
        self._prospects[query] = manager.key

    def _on_candidates(self, manager: ServiceManager, event: ProspectFinished, now: float) -> None:
        spec, manifest = manager.spec, manager.manifest
        if spec is None or manifest is None or spec.undeployed:
            return
        manager.last_candidates_s = now
        placement = manager.placement
        live = manager.counted()
        hosts = {p.host.node_id for p in live}
        offers = [Offer(n.contact.node_id, n.contact.address, n.attributes) for n in event.nodes
                  if n.contact.node_id not in hosts]
        if placement.mode == "every":
            desired, reason = len(offers) + len(live), f"every node that satisfies the constraints ({len(offers) + len(live)})"
        elif placement.replicas is not None:
            desired, reason = manager.desired, manager.desired_reason
        else:
            availabilities = [p.attributes.get("availability", math.nan) for p in live] + \
                             [o.attributes.get("availability", math.nan) for o in offers]
            chosen = replica_count(placement, [a if isinstance(a, int | float) else math.nan for a in availabilities],
                                   quorum=manifest.state_consistency == "quorum",
                                   unknown_availability=self.config.unknown_availability)
            desired, reason = chosen.count, chosen.reason
        if desired != manager.desired:
            self._decide(manager, "count", f"{desired} replicas: {reason}", now)
        manager.desired, manager.desired_reason = desired, reason  # (a changed reason alone is no decision)
        manager.offers = offers
        current = [p for p in live if p.bundle_blob == spec.bundle_blob]
        need = manager.desired - len(current)
        if need <= 0:
            manager.pending = ""
            return
        chosen_offers = self._place(manager, offers, need, now)
        if len(chosen_offers) < need:
            missing = need - len(chosen_offers)
            pending = (f"{missing} of {manager.desired} replicas pending: no other node satisfies the "
                       f"requirements with room to spare (the search found {event.matches_seen}, "
                       f"{len(chosen_offers)} of them taken now); searching again every {self.config.pending_retry_s:g} s")
            if pending != manager.pending:
                self._decide(manager, "pending", pending, now)
            manager.pending = pending
            manager.next_search_s = now + self.config.pending_retry_s
        else:
            manager.pending = ""

    def _place(self, manager: ServiceManager, offers: list[Offer], need: int, now: float) -> list[Offer]:
        """Start up to ``need`` replicas on the best of ``offers`` (not on a node that has one, that
        refused lately, or that this node's detector does not hold alive); the offers used."""
        manifest = manager.manifest
        assert manifest is not None
        placement = manager.placement
        exclude = {p.host.node_id for p in manager.replicas.values()}
        manager.refused = {node: until for node, until in manager.refused.items() if until > now}
        exclude |= set(manager.refused)
        exclude |= {o.node_id for o in offers if self._liveness(o.node_id) in (Liveness.dead, Liveness.suspect)}
        offers = [self._fresh(o) for o in offers]
        chosen = allocate(offers, need, demand=manifest.demand(), constraints=_constraints(manifest, placement),
                          spread=placement.spread, placed=[p.attributes for p in manager.live()], exclude=exclude)
        for offer in chosen:
            self._start(manager, offer, now)
        return chosen

    def _fresh(self, offer: Offer) -> Offer:
        """``offer`` at the address the routing table knows now (a node that restarted since the
        search listens elsewhere)."""
        address = self._fresh_contact(Contact(offer.node_id, offer.address)).address
        return offer if address == offer.address else Offer(offer.node_id, address, offer.attributes)

    def _start(self, manager: ServiceManager, offer: Offer, now: float) -> None:
        spec = manager.spec
        assert spec is not None
        replica_id = f"{spec.name}-{self.rng.getrandbits(32):08x}"
        host = Contact(offer.node_id, offer.address)
        request = self.client.start(
            offer.address, offer.node_id, replica_id, SignedBundle(b"", spec.bundle_key, spec.bundle_signature), now,
            blob_id=spec.blob_id, service=(manager.key, spec.name),
        )
        self._requests[request] = (manager.key, replica_id)
        replaces = manager.lost_at.popleft() if manager.lost_at else None
        placed = Placed(replica_id, host, "requested", now, spec.bundle_blob, reported_s=now, fine_s=now,
                        attributes=dict(offer.attributes), replaces_lost_s=replaces)
        manager.replicas[replica_id] = placed
        self._watch(host, now)
        if replaces is not None:
            self._decide(manager, "replaced", f"a replica lost {now - replaces:.1f} s ago", now, placed)
        else:
            self._decide(manager, "placed", _why_there(offer), now, placed)

    def _stop(self, manager: ServiceManager, placed: Placed, reason: str, now: float) -> None:
        if placed.stopping:
            return
        placed.stopping = True
        placed.reason = reason
        self._send_stop(manager, placed, now)
        decision = "surplus_stopped" if reason.startswith("surplus") else "stopped"
        self._decide(manager, decision, reason, now, placed)

    def _send_stop(self, manager: ServiceManager, placed: Placed, now: float) -> None:
        placed.stop_sent_s = now
        host = self._fresh_contact(placed.host)
        request = self.client.stop(host.address, host.node_id, placed.replica_id, now)
        self._requests[request] = (manager.key, placed.replica_id)

    def _on_remote_answer(self, event: RequestAnswered | RequestTimedOut, now: float) -> bool:
        entry = self._requests.pop(event.request_id, None)
        if entry is None:
            return False
        key, replica_id = entry
        manager = self.managers.get(key)
        placed = manager.replicas.get(replica_id) if manager is not None else None
        if manager is None or placed is None:
            return True
        if placed.stopping:
            if isinstance(event, RequestAnswered) and isinstance(event.reply, Refused) \
                    and event.reply.check == "replica":
                del manager.replicas[replica_id]  # the host does not have it (any more)
            return True
        if placed.asking:
            placed.asking = False
            if isinstance(event, RequestAnswered) and not isinstance(event.reply, Refused):
                placed.heard(event.reply, now)
            else:
                del manager.replicas[replica_id]
                why = "does not answer about it" if isinstance(event, RequestTimedOut) else "no longer has it"
                if placed.counts:
                    manager.lost_at.append(now)
                    self._decide(manager, "lost", f"host {_short(placed.host)} {why}", now, placed)
            return True
        if not placed.confirmed:
            if isinstance(event, RequestAnswered) and not isinstance(event.reply, Refused) \
                    and event.reply.replica_id == replica_id:
                placed.confirmed = True
                placed.heard(event.reply, now)
                self._watch(placed.host, now)
            else:
                del manager.replicas[replica_id]  # nobody there runs it: a false report
                self.dropped["unconfirmed_replica"] += 1
            return True
        if isinstance(event, RequestTimedOut) or isinstance(event.reply, Refused):
            reason = "no answer" if isinstance(event, RequestTimedOut) else str(event.reply)
            del manager.replicas[replica_id]
            if placed.replaces_lost_s is not None:
                manager.lost_at.appendleft(placed.replaces_lost_s)
            manager.refused[placed.host.node_id] = now + self.config.refused_retry_s
            manager.next_search_s = now
            self._decide(manager, "refused", reason, now, placed)
            return True
        placed.heard(event.reply, now)
        return True

    # -- reports a manager receives --------------------------------------------------------
    def _on_report(self, src: Address, msg: ReplicaReport, now: float) -> None:
        manager = self.managers.get(msg.service)
        if manager is None:
            record = self.records.get(msg.service)
            if record is None:
                self.dropped["report_for_unknown_service"] += 1
                return
            boss = self._manager_of(msg.service, record.group, now)
            if boss is not None:
                self.send(src, ReportAck(msg.service, self._fresh_contact(boss), self._fresh_group(record.group)))
            return
        if len(msg.replicas) > MAX_REPORTED:
            self.dropped["report_too_long"] += 1
            return
        host = Contact(msg.host, src)
        seen = set()
        for entry in msg.replicas:
            seen.add(entry.replica_id)
            placed = manager.replicas.get(entry.replica_id)
            if placed is None:
                if entry.state not in LIVE_STATES and entry.state != "failed":
                    continue
                placed = self._adopt(manager, entry.replica_id, host, entry.state, entry.bundle_blob, now)
                if placed is None:
                    self.dropped["reported_replicas_over_limit"] += 1
                    continue
            elif placed.host.node_id != msg.host:
                self.dropped["report_of_another_hosts_replica"] += 1
                continue
            elif placed.host.address != src:
                if self._fresh_contact(placed.host).address != src:
                    self.dropped["report_from_another_address"] += 1  # not its host speaking
                    continue
                placed.host = Contact(msg.host, src)  # the host listens elsewhere since it restarted
            was_running = placed.state == "running"
            placed.heard(entry, now)
            if entry.bundle_blob:
                placed.bundle_blob = entry.bundle_blob
            if entry.state == "running" and not was_running and placed.replaces_lost_s is not None:
                self._decide(manager, "healed", f"replacement running {now - placed.replaces_lost_s:.1f} s after "
                                                f"the loss", now, placed)
                placed.replaces_lost_s = None
        for placed in [p for p in manager.replicas.values() if p.host.node_id == msg.host]:
            if placed.replica_id not in seen and placed.state != "requested":
                del manager.replicas[placed.replica_id]
        wanted = {p.replica_id for p in manager.replicas.values() if not p.stopping}
        release = [e.replica_id for e in msg.replicas if e.state == "stopped" and e.replica_id not in wanted]
        self.send(src, ReportAck(msg.service, self.contact, self._fresh_group(manager.group), release))

    def _on_handoff(self, src: Address, msg: ManagerHandoff, now: float) -> None:
        record = self.records.get(msg.service)
        if record is None or self._member_at(record.group, src) is None:
            self.dropped["handoff_from_outside_the_group"] += 1
            return
        self._tick_service(msg.service, now)
        manager = self.managers.get(msg.service)
        if manager is None:
            self.dropped["handoff_not_managed_here"] += 1
            return
        for entry in msg.replicas[:MAX_REPORTED]:
            if entry.replica_id not in manager.replicas:
                self._adopt(manager, entry.replica_id, self._fresh_contact(entry.host), entry.state, entry.bundle_blob, now)

    def _adopt(self, manager: ServiceManager, replica_id: str, host: Contact, state: str, bundle_blob: bytes,
               now: float) -> Placed | None:
        """A replica this manager did not start, told of by its host or by the previous manager:
        kept unconfirmed (it does not count) until its host answers a signed query for it. None
        when the manager tracks as many as it may."""
        if len(manager.replicas) >= 2 * max(manager.desired, 1) + MAX_REPORTED:
            return None
        placed = manager.replicas[replica_id] = Placed(replica_id, host, state, now, bundle_blob, reported_s=now,
                                                       fine_s=now, confirmed=False)
        self._ask(manager, placed, host, now)
        return placed

    def _ask(self, manager: ServiceManager, placed: Placed, host: Contact, now: float) -> None:
        """Ask ``host`` for the status of ``placed`` (a signed query); the answer comes to
        :meth:`_on_remote_answer`."""
        request = self.client.query(host.address, host.node_id, placed.replica_id, now)
        self._requests[request] = (manager.key, placed.replica_id)

    def _on_liveness(self, event: PeerDeclaredDead | PeerRecovered, now: float) -> None:
        if isinstance(event, PeerDeclaredDead):
            for key, hosted in list(self.hosting.items()):
                if hosted.manager.node_id == event.node_id:
                    self._next_manager(key, hosted)
                    self._report(key, now)
        for key, record in list(self.records.items()):
            if any(m.node_id == event.node_id for m in record.group):
                self._tick_service(key, now)
        for manager in list(self.managers.values()):
            if any(p.host.node_id == event.node_id for p in manager.replicas.values()):
                self._reconcile(manager, now)

    # -- status queries --------------------------------------------------------------------
    def _on_query(self, src: Address, msg: ServiceQuery, now: float) -> None:
        manager = self.managers.get(msg.service)
        if manager is not None:
            self.send(src, self.report_of(manager, msg.query_id))
            return
        record = self.records.get(msg.service)
        if record is None:
            return
        boss = self._manager_of(msg.service, record.group, now)
        self.send(src, ServiceReport(msg.query_id, msg.service, False, boss, record.item_sequence, 0, "", [], []))

    def _on_quorum(self, event: QuorumFinished, now: float) -> bool:
        key = self._reads.pop(event.query_id, None)
        if key is not None:
            manager = self.managers.get(key)
            if manager is not None:
                manager.refreshing = None
                if event.ok and event.item is not None:
                    self._load_spec(manager, event.item.sequence, event.item.value, now)
            return True
        op = self._op_of.pop(event.query_id, None)
        if op is None:
            return False
        self._owner_step(op, event, now)
        return True

    # -- decisions -------------------------------------------------------------------------
    def _decide(self, manager: ServiceManager, decision: str, reason: str, now: float,
                placed: Placed | None = None) -> None:
        made = Decision(str(manager.service), decision, reason, now,
                        placed.replica_id if placed is not None else "", placed.host.node_id if placed else 0)
        manager.decisions.append(made)
        self.counters[decision] += 1
        self.emit(made)
        if self.pubsub is not None:
            attributes = {"kind": "service_decided", "service": made.service, "decision": decision,
                          "reason": reason[:300], "replica": made.replica_id, "node": f"{made.host:040x}"}
            try:
                self.pubsub.publish(manager.service.topic, attributes, now)
            except ValueError:
                self.dropped["decision_unpublishable"] += 1


__all__ = [
    "LIVE_STATES",
    "MAX_LISTED",
    "SERVICES_LIST_NAME",
    "DeployFinished",
    "Deployment",
    "DeploymentConfig",
    "Placed",
    "ServiceManager",
    "ServicesListed",
    "StatusFinished",
]
