"""Bundles by content id: a replica's bundle fetched from replicated persistence, once per node.

A deployer stores a bundle once as a blob (``Persistence.put_blob``) and starts replicas with a
``StartReplica`` that names the blob's id instead of carrying the bytes. The node's
:class:`~p2pdeploy.resource.protocol.RemoteControl` accepts such a start, and the replica waits
in ``fetching`` with a ``FetchBundle(replica_id, digest)`` whose digest is the blob id.

:class:`BundleFetcher` sits in the node's stack above persistence and the replica host. It
consumes that ``FetchBundle`` (only for a start by blob id that the remote protocol is waiting
on; any other goes on to the driver), asks persistence for the blob with ``keep=True`` and
consumes the ``BlobFetched`` of its own queries, no other. Then:

- the bytes go to ``RemoteControl.bundle_fetched`` (where the driver parses bundles off its event
  loop, ``RemoteConfig.parse_bundles_ahead``, after the driver parsed them: the fetcher emits
  ``BundleToCheck`` and the driver answers with :meth:`BundleFetcher.bundle_checked`), which checks them exactly as it checks an
  inline bundle (the signature, by a key the owner trusts; a safe archive and a valid manifest;
  the requirements; admission) and installs the replica, or fails it with the reason
  (``bundle: signed by ..., a key this node's owner does not trust``);
- a blob that cannot be had fails its replicas with ``bundle fetch failed: REASON``: ``chunk
  KEY not found: hash mismatch (...)`` when the copies holders sent failed their hash check
  here, ``(N nodes said they held it but had no intact copy)`` when the holders' own stores
  found their copies corrupt and dropped them.

Every chunk is verified against its hash on the way (the blob id is the hash of the blob's
manifest, which lists the hashes of its chunks), and with ``keep`` the chunks stay pinned in the
node's durable store (SQLite and chunk files in the data directory on a real node): that store
is the node's bundle cache. Persistence serves a chunk it holds from the store without asking
the network, so a second replica of a bundle this node holds fetches nothing (``counters["local"]``);
starts of the same bundle while its fetch runs share that fetch (``counters["shared"]``). A
bundle that no replica accepted (refused by the checks) is unpinned again, so an untrusted
bundle is not kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.collective.persistence import BlobFetched, Persistence
from p2pdeploy.core import Address, Protocol
from p2pdeploy.fabric.supervisor import FetchBundle
from p2pdeploy.resource.bundle import Bundle, BundleError
from p2pdeploy.resource.protocol import BLOB_ID_BYTES, RemoteControl


@dataclass(frozen=True, slots=True)
class BundleToCheck:
    """A fetched bundle for the driver to parse off its event loop; it answers with
    :meth:`BundleFetcher.bundle_checked` (only where ``RemoteConfig.parse_bundles_ahead``)."""

    blob_id: int
    data: bytes = field(repr=False)


class BundleFetcher(Protocol):
    """Fetches the bundles of starts by blob id from persistence; see the module docstring."""

    consumes = (FetchBundle, BlobFetched)

    def __init__(self, persistence: Persistence, remote: RemoteControl) -> None:
        super().__init__()
        self.persistence = persistence
        self.remote = remote
        #: ``fetched`` (from the network), ``local`` (held here already), ``shared`` (joined a
        #: fetch under way), ``failed`` (could not be had), ``refused`` (fetched, failed a check).
        self.counters: Counter[str] = Counter()
        self._queries: dict[int, int] = {}  # persistence query id -> blob id
        self._waiting: dict[int, list[str]] = {}  # blob id -> replica ids waiting for it, in order
        self._checking: dict[int, tuple[list[str], bytes]] = {}  # blob id -> its replicas and bytes, at the driver

    def fetching(self) -> dict[int, list[str]]:
        """The blobs being fetched and the replicas waiting for each."""
        return {blob_id: list(replicas) for blob_id, replicas in self._waiting.items()}

    # -- events of the layers below --------------------------------------------------------
    def handle_event(self, event: Any, now: float) -> bool:
        if isinstance(event, FetchBundle):
            return self._fetch(event, now)
        if isinstance(event, BlobFetched):
            return self._fetched(event, now)
        return False

    def _fetch(self, event: FetchBundle, now: float) -> bool:
        blob = self.remote.awaits_bundle(event.replica_id)
        if blob is None or blob != event.digest or len(blob) != BLOB_ID_BYTES:
            return False  # not a start by blob id: not ours
        blob_id = int.from_bytes(blob, "big")
        waiting = self._waiting.get(blob_id)
        if waiting is not None:
            waiting.append(event.replica_id)
            self.counters["shared"] += 1
            return True
        self._waiting[blob_id] = [event.replica_id]
        self.counters["local" if self.persistence.holds_blob(blob_id) else "fetched"] += 1
        query = self.persistence.get_blob(blob_id, now, keep=True)
        self._queries[query] = blob_id
        return True

    def _fetched(self, event: BlobFetched, now: float) -> bool:
        blob_id = self._queries.pop(event.query_id, None)
        if blob_id is None:
            return False  # another layer's (or the driver's) query
        replicas = self._waiting.pop(blob_id, [])
        if event.data is None:
            self.counters["failed"] += 1
            for replica_id in replicas:
                self.remote.bundle_unavailable(replica_id, f"bundle fetch failed: {event.reason}", now)
            return True
        if self.remote.config.parse_bundles_ahead:
            self._checking[blob_id] = (replicas, event.data)
            self.emit(BundleToCheck(blob_id, event.data))
            return True
        self._install(blob_id, replicas, event.data, now)
        return True

    def bundle_checked(self, blob_id: int, result: Bundle | BundleError, now: float) -> None:
        """What parsing the bundle of ``BundleToCheck(blob_id)`` gave; its replicas go on."""
        entry = self._checking.pop(blob_id, None)
        if entry is None:
            return
        replicas, data = entry
        self.remote.bundle_parsed(data, result)
        self._install(blob_id, replicas, data, now)

    def _install(self, blob_id: int, replicas: list[str], data: bytes, now: float) -> None:
        accepted = False
        for replica_id in replicas:
            if self.remote.bundle_fetched(replica_id, data, now):
                accepted = True
            else:
                self.counters["refused"] += 1
        if not accepted and not self._in_use(blob_id):
            self.persistence.unpin(blob_id)  # nothing here runs it: do not keep it

    def _in_use(self, blob_id: int) -> bool:
        """Whether a replica on this node that has not finished was started from this blob."""
        blob = blob_id.to_bytes(BLOB_ID_BYTES, "big")
        host = self.remote.host
        for replica_id in list(host.requested_by):
            supervisor = host.supervisor(replica_id)
            if supervisor is not None and supervisor.digest == blob and not supervisor.finished:
                return True
        return False

    # -- the core contract: no messages, no timers of its own ------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        self.dropped["unexpected"] += 1

    def on_timer(self, name: Hashable, now: float) -> None:
        pass
