"""The replicas of one node: a supervisor per replica, and the admission ledger they draw on.

:class:`ReplicaHost` is a core layer with no messages of its own. The remote protocol (and,
later, the deployer) calls :meth:`ReplicaHost.start_replica` and :meth:`stop_replica`; the
driver passes the executor commands it emits to its executor and feeds the executor's reports
back through :meth:`report`. A replica holds its reservation until it is finished (stopped, or
failed with no restart coming); then its files stay, for its logs and data, for the owner's
``retention_s`` and hold the disk it reserved until :meth:`forget` removes them (at the end of
that period, unless the same id starts again in them first). The files of replicas an earlier
run of the node left (the executor reports them as ``FilesLeft`` when it starts) are held and
removed the same way, their period counted from when their replica ended.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from p2pdeploy.core import Address, KeyedChildren, Protocol, Rng
from p2pdeploy.fabric.admission import Admission, Demand, Refusal
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import ExecutorReport, FilesLeft, Removed, RemoveReplica
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, ReplicaStatus, Supervisor

#: The timer that removes a finished replica's files: ``(REMOVE, replica_id)``.
REMOVE = "remove"


class ReplicaHost(Protocol):
    handles: tuple[type, ...] = ()

    def __init__(self, contribution: Contribution, rng: Rng | None = None) -> None:
        super().__init__()
        self.admission = Admission(contribution)
        self.rng = rng
        self._supervisors: KeyedChildren[str, Supervisor] = KeyedChildren()
        #: Who asked for each replica (the public key that signed the start), for authorization.
        self.requested_by: dict[str, bytes] = {}
        #: Replicas whose files an earlier run of the node left, waiting for their removal.
        self.files_left: set[str] = set()

    @property
    def contribution(self) -> Contribution:
        return self.admission.contribution

    # -- API -------------------------------------------------------------------------------
    def start_replica(
        self,
        spec: ReplicaSpec,
        demand: Demand,
        now: float,
        *,
        bundle: bytes | None = None,
        digest: bytes = b"",
        requested_by: bytes = b"",
    ) -> Refusal | None:
        """Admit and start a replica; the refusal (nothing started) when it does not fit.

        An id whose replica has finished (stopped, or failed for good) may be started again: the
        new replica takes its place and its directory, so the service's data and logs carry over.
        """
        replica_id = spec.replica_id
        existing = self._supervisors.get(replica_id)
        if existing is not None and not existing.finished:
            return Refusal("replica", f"replica: {replica_id} already exists on this node ({existing.status()})")
        refusal = self.admission.reserve(replica_id, demand)  # a finished replica holds only its disk
        if refusal is not None:
            return refusal
        self.cancel_timer((REMOVE, replica_id))
        self.files_left.discard(replica_id)
        supervisor = Supervisor(spec, self.rng, digest=digest)
        self._supervisors[replica_id] = supervisor
        self.requested_by[replica_id] = requested_by
        supervisor.start(now, bundle)
        self._collect(now)
        return None

    def stop_replica(self, replica_id: str, now: float, reason: str = "stop requested") -> bool:
        supervisor = self._supervisors.get(replica_id)
        if supervisor is None:
            return False
        supervisor.stop(now, reason)
        self._collect(now)
        return True

    def fetch_replica(self, replica_id: str, digest: bytes, now: float, *, requested_by: bytes = b"") -> Refusal | None:
        """Start a replica whose bundle must be fetched first (its manifest, and so its spec and
        demand, come with it): it waits in ``fetching`` (``FetchBundle(replica_id, digest)``) and
        reserves nothing until :meth:`bundle_fetched` gives its spec and demand."""
        existing = self._supervisors.get(replica_id)
        if existing is not None and not existing.finished:
            return Refusal("replica", f"replica: {replica_id} already exists on this node ({existing.status()})")
        self.cancel_timer((REMOVE, replica_id))  # its files (and their disk) wait for the new bundle
        self.files_left.discard(replica_id)
        supervisor = Supervisor(ReplicaSpec.awaiting_bundle(replica_id), self.rng, digest=digest)
        self._supervisors[replica_id] = supervisor
        self.requested_by[replica_id] = requested_by
        supervisor.start(now)
        self._collect(now)
        return None

    def bundle_fetched(
        self,
        replica_id: str,
        bundle: bytes,
        now: float,
        *,
        spec: ReplicaSpec | None = None,
        demand: Demand | None = None,
    ) -> Refusal | None:
        """The bundle a fetching replica waits for: installed. With ``spec`` and ``demand`` (a
        replica from :meth:`fetch_replica`) it is admitted first; when it does not fit, the
        replica fails (``admission: ...``) and the refusal is returned."""
        supervisor = self._supervisors.get(replica_id)
        if supervisor is None or supervisor.state is not ReplicaState.FETCHING:
            return None
        if demand is not None:
            refusal = self.admission.reserve(replica_id, demand)
            if refusal is not None:
                supervisor.fetch_failed(f"admission: {refusal.reason}", now)
                self._collect(now)
                return refusal
        supervisor.bundle_fetched(bundle, now, spec)
        self._collect(now)
        return None

    def fetch_failed(self, replica_id: str, reason: str, now: float) -> None:
        """A fetching replica's bundle could not be had or was refused: it fails with ``reason``."""
        supervisor = self._supervisors.get(replica_id)
        if supervisor is not None:
            supervisor.fetch_failed(reason, now)
            self._collect(now)

    def forget(self, replica_id: str, now: float) -> bool:
        """Remove a finished replica's files (``RemoveReplica``); False while it still runs."""
        supervisor = self._supervisors.get(replica_id)
        if supervisor is None and replica_id in self.files_left:
            self.files_left.discard(replica_id)
        elif supervisor is None or not supervisor.finished:
            return False
        else:
            del self._supervisors[replica_id]
        self.requested_by.pop(replica_id, None)
        self.admission.release(replica_id)
        self.cancel_timer((REMOVE, replica_id))
        self.emit(RemoveReplica(replica_id))
        return True

    def report(self, report: ExecutorReport, now: float) -> None:
        """An executor report; routed to the replica's supervisor."""
        if isinstance(report, Removed):
            return
        if isinstance(report, FilesLeft):
            self._files_left(report, now)
            return
        supervisor = self._supervisors.get(report.replica_id)
        if supervisor is None:
            self.dropped["unknown_replica"] += 1
            return
        supervisor.report(report, now)
        self._collect(now)

    def _files_left(self, report: FilesLeft, now: float) -> None:
        """Hold the disk of files an earlier run left until their retention period ends."""
        replica_id = report.replica_id
        if replica_id in self._supervisors or self.timer_deadline((REMOVE, replica_id)) is not None:
            return  # started again (in its files) before the executor's report came
        self.files_left.add(replica_id)
        self.admission.hold_files(replica_id, report.disk_bytes)
        self.set_timer((REMOVE, replica_id), now + max(0.0, self.contribution.retention_s - report.age_s))

    # -- queries ---------------------------------------------------------------------------
    def status(self, replica_id: str) -> ReplicaStatus | None:
        supervisor = self._supervisors.get(replica_id)
        return None if supervisor is None else supervisor.status()

    def statuses(self) -> list[ReplicaStatus]:
        return [s.status() for s in self._supervisors.values()]

    def supervisor(self, replica_id: str) -> Supervisor | None:
        return self._supervisors.get(replica_id)

    # -- the core contract -----------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        self.dropped["unexpected"] += 1

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        self._supervisors.handle_timer(now)
        self._collect(now)

    def on_timer(self, name: Hashable, now: float) -> None:
        if isinstance(name, tuple) and name[0] == REMOVE:
            self.forget(name[1], now)  # its retention period is over

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._supervisors.next_deadline(), super().next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def _collect(self, now: float) -> None:
        """Move the supervisors' output into this layer's; a replica that just finished gives
        back its reservation but its disk, and its files are removed after the retention period."""
        self._supervisors.drain(self)
        for replica_id, supervisor in self._supervisors.items():
            if supervisor.finished and self.timer_deadline((REMOVE, replica_id)) is None:
                self.admission.retain(replica_id)
                self.set_timer((REMOVE, replica_id), now + self.contribution.retention_s)
