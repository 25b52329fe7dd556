"""The remote protocol: start, stop, status and logs of a replica on a node, with authorization.

Requests (``StartReplica``, ``StopReplica``, ``QueryReplica``, ``FetchLogs``) are signed with
Ed25519 by the key that sends them, over the canonical wire encoding of the request with an
empty signature (``b"p2pdeploy remote v1\\n" + encode(request)``). Each carries the target
node's id, a random 16-byte nonce and the sender's wall-clock timestamp, so a request cannot be
replayed: not to another node (the node id is signed), not later (the timestamp must be within
``window_s`` of the node's clock), not within the window (the node keeps every nonce it
accepted until its timestamp leaves the window), and not after the node restarted, when that
memory is gone (a request signed before the node started is refused: it may have been accepted
by the node's previous run).

A node answers every request with a reply (``StatusReply``, ``LogsReply``) or a ``Refused``
naming the check that failed and why. :class:`RemoteControl` checks, in this order:

1. ``signature``: the request is signed by the key it names;
2. ``node``: it is addressed to this node;
3. ``stale``: its timestamp is within ``window_s`` of this node's wall clock;
4. ``replay``: it was signed after this node started, and its nonce was not seen in the window
   (nonces are remembered only for keys the node knows, so that strangers, refused next anyway,
   cannot fill the cache);
5. ``trust`` (start, status): the owner trusts the key (``Contribution.trusted_keys``);
   ``authorization`` (stop, logs): the key started the replica, or is an owner key;
6. ``bundle`` (start): the bundle's signature is valid, by a key the owner trusts, and the
   bundle is safe and its manifest valid;
7. ``requirements`` (start): the manifest's requirements hold on this node;
8. ``admission`` (start): the replica fits the owner's contribution.

A start may name its bundle by content id instead of carrying it (``bundle_blob``: the id of
the blob that holds it in replicated persistence, which the request's signature covers). The
node then checks 1-5, answers at once with the replica ``fetching``, and the replica asks for
its bundle (``FetchBundle``, the blob id as its digest; the
:class:`~p2pdeploy.collective.bundles.BundleFetcher` layer fetches it). Checks 6-8 follow when
the bytes arrive (:meth:`RemoteControl.bundle_fetched`, the same code as for an inline bundle);
one that fails fails the replica with its reason, which a status request reports.

Reading a bundle's members means decompressing all of it (up to 256 MiB from 4 MiB), which takes
seconds: a driver that must keep answering meanwhile (``RemoteConfig.parse_bundles_ahead``)
parses an inline bundle ahead, in a worker (:meth:`RemoteControl.worth_parsing_ahead`,
:meth:`RemoteControl.bundle_parsed`), before it delivers the start, and a fetched one when the
fetcher asks (``BundleToCheck``); check 6 then uses that result. The simulator parses in place.

Only then does it act, through the :class:`~p2pdeploy.fabric.replicas.ReplicaHost` layer it
wraps. Logs are I/O: the node emits ``LogsRequested`` and the driver answers with
:meth:`RemoteControl.answer_logs`.

Time: signed timestamps are wall-clock seconds, while a node's core runs on the driver's clock
(monotonic in the runtime, virtual in the simulator). Both protocol objects here take the
``now`` every layer gets and add ``wall_clock_offset_s`` (the driver sets it to wall time minus
its clock, :meth:`set_wall_clock_offset`); with an offset of 0, ``now`` is wall time.

:class:`RemoteClient` is the sending side: it signs requests, matches replies and times out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaStatus
from p2pdeploy.overlay.identity import Identity, node_id_of, verify
from p2pdeploy.overlay.requests import RequestTracker
from p2pdeploy.overlay.storage import record_key
from p2pdeploy.resource.bundle import (
    MAX_BUNDLE_BYTES,
    Bundle,
    BundleError,
    SignedBundle,
    bundle_digest,
    verify_bundle,
)
from p2pdeploy.resource.description import node_attributes
from p2pdeploy.resource.manifest import ManifestError
from p2pdeploy.wire import STREAM_LIMIT_BYTES, NodeId, encode, message

SIGNATURE_CONTEXT = b"p2pdeploy remote v1\n"
NONCE_BYTES = 16
PUBLIC_KEY_BYTES = 32
#: A blob id (a Kademlia key) on the wire: 160 bits, big-endian.
BLOB_ID_BYTES = 20
MAX_LOG_BYTES = 64 * 1024
#: Log reads waiting for the driver at once; beyond it a ``FetchLogs`` is refused as ``busy``.
MAX_LOGS_WAITING = 1024
#: Bundles the driver parsed ahead, kept for the starts that carry them (the oldest dropped first).
MAX_PARSED_AHEAD = 8
#: Requests a client waits for at once; beyond it its API raises ``RequestsFull``.
MAX_CLIENT_REQUESTS = 4096


def _check_common(msg: Any) -> None:
    if len(msg.signer) != PUBLIC_KEY_BYTES:
        raise ValueError(f"signer must be a {PUBLIC_KEY_BYTES}-byte public key")
    if len(msg.nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    if len(msg.replica_id) > 64:
        raise ValueError("replica_id is longer than 64 characters")


# -- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SignedRequest:
    """The fields every request starts with, in this order on the wire; each request adds its own
    after them, and its ``signature`` (empty while it is signed)."""

    request_id: int
    node: NodeId
    signer: bytes
    nonce: bytes
    timestamp: float
    replica_id: str

    def __post_init__(self) -> None:
        _check_common(self)


@message(30)
class StartReplica(_SignedRequest):
    bundle: bytes
    bundle_key: bytes
    bundle_signature: bytes
    bindings: dict[str, str]
    signature: bytes = b""
    #: The bundle by content id instead of inline: the 20-byte id of the blob that holds it in
    #: replicated persistence (``bundle`` is then empty). The request's signature covers it.
    bundle_blob: bytes = b""
    #: The service the replica belongs to, when its manager starts it: the 20-byte key of the
    #: service's record (:mod:`p2pdeploy.collective.deployment`). Its replicas may be stopped by
    #: any key the node trusts, since the service's manager moves from node to node.
    service: bytes = b""
    #: The service's name (its manifest's): with the bundle's signer it makes the service's key.
    service_name: str = ""

    def __post_init__(self) -> None:
        _check_common(self)
        if self.service and len(self.service) != BLOB_ID_BYTES:
            raise ValueError(f"service must be a {BLOB_ID_BYTES}-byte key")
        if bool(self.service) != bool(self.service_name) or len(self.service_name) > 48:
            raise ValueError("a start names its service by key and name (at most 48 characters), or not at all")
        if len(self.bundle) > MAX_BUNDLE_BYTES:
            raise ValueError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
        if self.bundle_blob:
            if len(self.bundle_blob) != BLOB_ID_BYTES:
                raise ValueError(f"bundle_blob must be a {BLOB_ID_BYTES}-byte blob id")
            if self.bundle:
                raise ValueError("a start carries the bundle or names its blob, not both")

    @property
    def blob_id(self) -> int | None:
        """The id of the blob holding the bundle (``Persistence.get_blob`` takes it); ``None`` inline."""
        return int.from_bytes(self.bundle_blob, "big") if self.bundle_blob else None

    @property
    def service_key(self) -> int | None:
        return int.from_bytes(self.service, "big") if self.service else None


@message(31)
class StopReplica(_SignedRequest):
    signature: bytes = b""


@message(32)
class QueryReplica(_SignedRequest):
    signature: bytes = b""


@message(33)
class FetchLogs(_SignedRequest):
    max_bytes: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_common(self)
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")


# -- replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as its users see it from another process: the supervisor's
    :class:`~p2pdeploy.fabric.supervisor.ReplicaStatus` without what only its node can use (pid,
    times). The fields a replica's status reply and the node's status listing share."""

    replica_id: str
    state: str
    reason: str
    run: int
    restarts: int
    port: int | None
    healthy: bool

    @classmethod
    def of(cls, status: ReplicaStatus, **rest: Any) -> Any:
        """``cls`` built from ``status``, with its further fields from ``rest``."""
        return cls(replica_id=status.replica_id, state=status.state.value, reason=status.reason, run=status.run,
                   restarts=status.restarts, port=status.port, healthy=status.healthy, **rest)

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}" if self.reason else self.state


@message(34)
class StatusReply(ReplicaView):
    request_id: int


@message(35)
class LogsReply:
    request_id: int
    replica_id: str
    data: bytes


@message(36)
class Refused:
    request_id: int
    #: The check that refused: signature, node, stale, replay, trust, authorization, bundle,
    #: requirements, admission, replica, busy.
    check: str
    reason: str

    def __str__(self) -> str:
        return self.reason


REQUESTS = (StartReplica, StopReplica, QueryReplica, FetchLogs)
REPLIES = (StatusReply, LogsReply, Refused)
Request = StartReplica | StopReplica | QueryReplica | FetchLogs
Reply = StatusReply | LogsReply | Refused


def signing_payload(request: Request) -> bytes:
    """What the sender signs: the request with an empty signature, canonically encoded."""
    unsigned = dataclasses.replace(request, signature=b"")
    return SIGNATURE_CONTEXT + encode(unsigned, STREAM_LIMIT_BYTES)


def sign_request(request: Request, identity: Identity) -> Request:
    """``request`` signed by ``identity`` (its ``signer`` must be ``identity``'s public key)."""
    if request.signer != identity.public_key:
        raise ValueError("the request names another signer than this identity")
    return dataclasses.replace(request, signature=identity.sign(signing_payload(request)))


def verify_request(request: Request) -> bool:
    return verify(request.signer, request.signature, signing_payload(request))


def _key(public_key: bytes) -> str:
    return public_key.hex()[:16] + "…"


class StartRefusal(Exception):
    """A start's bundle or replica failed a check: ``check`` names it (``bundle``, ...)."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaStartAccepted:
    replica_id: str
    signer: bytes
    service: str
    version: str


def _check_service_name(msg: StartReplica, bundle: Bundle) -> None:
    if msg.service and bundle.manifest.name != msg.service_name:
        raise StartRefusal("bundle", f"bundle: its manifest names {bundle.manifest.name!r}, the start the service "
                                     f"{msg.service_name!r}")


def service_key_of(name: str, owner: bytes) -> int:
    """The key of the service ``NAME@OWNER``: the overlay key of its owner's record ``service/NAME``."""
    return record_key(owner, b"service/" + name.encode())


@dataclass(frozen=True, slots=True)
class ManagedReplica:
    """A replica a service's manager started here: the service's key and who asked."""

    service_key: int
    manager: Address
    manager_id: int
    #: The service is ``service_name@owner``: the manifest's name and the bundle's signer.
    service_name: str
    owner: bytes


@dataclass(frozen=True, slots=True)
class ReplicaStopAccepted:
    replica_id: str
    signer: bytes


@dataclass(frozen=True, slots=True)
class RequestRefused:
    src: Address
    request: str
    check: str
    reason: str


@dataclass(frozen=True, slots=True)
class LogsRequested:
    """The driver reads the replica's logs and calls ``RemoteControl.answer_logs(token, data, now)``."""

    token: int
    replica_id: str
    max_bytes: int


# -- the node side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    #: Requests whose timestamp is further than this from the node's clock are refused.
    window_s: float = 120.0
    #: Nonces remembered at once; beyond it new requests are refused as ``busy``.
    max_nonces: int = 100_000
    max_log_bytes: int = MAX_LOG_BYTES
    logs_timeout_s: float = 10.0
    max_bundle_bytes: int = MAX_BUNDLE_BYTES
    #: The driver parses bundles ahead, off its event loop (see the module docstring): the
    #: runtime does; the simulator parses in place.
    parse_bundles_ahead: bool = False

    def __post_init__(self) -> None:
        require_positive(self, "remote.", "window_s")
        require_at_least(self, "remote.", 1, "max_nonces")
        require_positive(self, "remote.", "logs_timeout_s")


class RemoteControl(Protocol):
    """The node side: checks each request and acts on the replicas it hosts."""

    handles = REQUESTS

    def __init__(
        self,
        node_id: int,
        host: ReplicaHost,
        *,
        machine: Machine | None = None,
        owner_keys: frozenset[bytes] = frozenset(),
        config: RemoteConfig | None = None,
        wall_clock_offset_s: float = 0.0,
        node_attributes_extra: Mapping[str, Any] | None = None,
        started_s: float | None = None,
    ) -> None:
        """``started_s``: when this node started, on the driver's clock; requests signed before it
        are refused as replays (``None``: the node remembers every nonce it ever accepted, as in a
        test that never restarts it)."""
        super().__init__()
        self.node_id = node_id
        self.host = host
        self.machine = machine
        #: Keys that may stop or read any replica here (the node's own key, its owner's).
        self.owner_keys = frozenset(owner_keys)
        self.config = config or RemoteConfig()
        self.wall_clock_offset_s = wall_clock_offset_s
        self.started_s = started_s
        self.extra_attributes = dict(node_attributes_extra or {})
        #: Refusals by check (``signature``, ``replay``...), for the node's counters.
        self.refused: Counter[str] = Counter()
        self._nonces: dict[bytes, float] = {}  # nonce -> wall time after which it is stale anyway
        #: Log reads the driver has been asked for: token -> (asker, its request id, replica id).
        self._logs_waiting: RequestTracker[tuple[Address, int, str]] = RequestTracker(
            self, "logs", limit=MAX_LOGS_WAITING, what="log reads"
        )
        #: Starts by blob id whose replica is fetching its bundle, by replica id.
        self._awaiting: dict[str, StartReplica] = {}
        #: Replicas started by a service's manager (bounded by the replicas the host keeps).
        self.managed: dict[str, ManagedReplica] = {}
        #: What the driver found parsing inline bundles ahead: digest -> the bundle, or why not.
        self._parsed_ahead: dict[bytes, Bundle | BundleError] = {}

    # -- configuration from the driver -----------------------------------------------------
    def set_wall_clock_offset(self, offset_s: float) -> None:
        """Wall time minus the driver's clock; the driver refreshes it when its clock drifts."""
        self.wall_clock_offset_s = offset_s

    def update_machine(self, machine: Machine) -> None:
        self.machine = machine

    def attributes(self) -> dict[str, Any]:
        """This node's description, as requirements see it."""
        return node_attributes(self.host.contribution, self.host.admission.free(), self.machine, **self.extra_attributes)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        if not isinstance(msg, REQUESTS):
            self.dropped["unexpected"] += 1
            return
        refusal = self._check_envelope(msg, now)
        if refusal is None:
            if isinstance(msg, StartReplica):
                self._start(src, msg, now)
                return
            if isinstance(msg, StopReplica):
                refusal = self._stop(src, msg, now)
            elif isinstance(msg, QueryReplica):
                refusal = self._query(src, msg)
            else:
                refusal = self._logs(src, msg, now)
        if refusal is not None:
            self._refuse(src, msg, *refusal)

    def _check_envelope(self, msg: Request, now: float) -> tuple[str, str] | None:
        if not verify_request(msg):
            return "signature", "signature: the request is not signed by the key it names"
        if msg.node != self.node_id:
            return "node", f"node: the request is for node {msg.node:040x}, this is {self.node_id:040x}"
        wall = now + self.wall_clock_offset_s
        window = self.config.window_s
        skew = msg.timestamp - wall
        if abs(skew) > window:
            direction = "ahead of" if skew > 0 else "behind"
            return "stale", f"stale: the request's timestamp is {abs(skew):.0f} s {direction} this node's clock (allowed ±{window:g} s)"
        if self.started_s is not None and msg.timestamp < self.started_s + self.wall_clock_offset_s:
            before = self.started_s + self.wall_clock_offset_s - msg.timestamp
            return "replay", (f"replay: the request was signed {before:.1f} s before this node started, so it may "
                              f"have been received already; sign it again")
        if msg.nonce in self._nonces:
            return "replay", "replay: this request (its nonce) was already received"
        if not self._known_key(msg.signer):
            return None  # refused by the trust check next; a stranger cannot fill the nonce cache
        if len(self._nonces) >= self.config.max_nonces:
            self._expire_nonces(wall)
            if len(self._nonces) >= self.config.max_nonces:
                return "busy", "busy: too many requests within the replay window; retry later"
        self._nonces[msg.nonce] = msg.timestamp + window
        if self.timer_deadline("nonces") is None:
            self.set_timer("nonces", now + window)
        return None

    def _known_key(self, signer: bytes) -> bool:
        """A key some request of which this node may act on: trusted, an owner's, or a replica's starter."""
        return (
            self.host.contribution.trusts(signer)
            or signer in self.owner_keys
            or signer in self.host.requested_by.values()
        )

    def _authorized(self, signer: bytes, replica_id: str) -> bool:
        return (
            signer in self.owner_keys
            or self.host.requested_by.get(replica_id) == signer
            or (replica_id in self.managed and self._trusts(signer))
        )

    def _note_managed(self, src: Address, msg: StartReplica) -> None:
        key = msg.service_key
        if key is not None:
            self.managed[msg.replica_id] = ManagedReplica(key, src, node_id_of(msg.signer), msg.service_name,
                                                          msg.bundle_key)

    def managed_replicas(self) -> dict[str, ManagedReplica]:
        """The replicas here that services' managers started (those this node still has)."""
        for replica_id in [r for r in self.managed if self.host.status(r) is None]:
            del self.managed[replica_id]
        return dict(self.managed)

    def _trusts(self, key: bytes) -> bool:
        return self.host.contribution.trusts(key) or key in self.owner_keys

    def worth_parsing_ahead(self, msg: Any) -> bool:
        """Whether the driver should parse ``msg``'s inline bundle ahead (:meth:`bundle_parsed`):
        a start by a key this node trusts, with a bundle signed by a trusted key. Anything else is
        refused without reading the bundle, so a stranger cannot make the driver decompress."""
        return (
            self.config.parse_bundles_ahead
            and isinstance(msg, StartReplica)
            and bool(msg.bundle)
            and self._trusts(msg.signer)
            and self._trusts(msg.bundle_key)
            and verify_bundle(msg.bundle, msg.bundle_signature, msg.bundle_key)
        )

    def bundle_parsed(self, data: bytes, result: Bundle | BundleError) -> None:
        """What ``Bundle.parse(data, max_bytes=config.max_bundle_bytes)`` gave, run by the driver
        off its event loop; the start that carries ``data`` (or the replicas a fetched bundle is
        for), delivered next, use it."""
        self._parsed_ahead[bundle_digest(data)] = result
        while len(self._parsed_ahead) > MAX_PARSED_AHEAD:
            del self._parsed_ahead[next(iter(self._parsed_ahead))]

    def _start(self, src: Address, msg: StartReplica, now: float) -> None:
        if not self._trusts(msg.signer):
            self._refuse(src, msg, "trust", f"trust: key {_key(msg.signer)} is not trusted by this node's owner")
            return
        if msg.service and service_key_of(msg.service_name, msg.bundle_key) != msg.service_key:
            self._refuse(src, msg, "service", f"service: the start's service key is not that of {msg.service_name}@"
                                              f"{_key(msg.bundle_key)}, the bundle's signer")
            return
        if msg.bundle_blob:
            self._start_by_blob(src, msg, now)
            return
        try:
            bundle = self.check_bundle(msg.bundle, msg.bundle_key, msg.bundle_signature)
            _check_service_name(msg, bundle)
        except StartRefusal as exc:
            self._refuse(src, msg, exc.check, exc.reason)
            return
        if self._answered_existing(src, msg, bundle.digest):
            return
        try:
            spec, demand = self.plan_replica(bundle, msg.replica_id, msg.bindings)
        except StartRefusal as exc:
            self._refuse(src, msg, exc.check, exc.reason)
            return
        refusal = self.host.start_replica(
            spec, demand, now, bundle=msg.bundle, digest=bundle.digest, requested_by=msg.signer
        )
        if refusal is not None:
            check = "replica" if refusal.resource == "replica" else "admission"
            self._refuse(src, msg, check, f"admission: {refusal.reason}" if check == "admission" else refusal.reason)
            return
        manifest = bundle.manifest
        self._note_managed(src, msg)
        self.emit(ReplicaStartAccepted(msg.replica_id, msg.signer, manifest.name, manifest.version))
        status = self.host.status(msg.replica_id)
        assert status is not None
        self._reply_status(src, msg.request_id, status)

    def _answered_existing(self, src: Address, msg: StartReplica, digest: bytes) -> bool:
        """A start for an id this node has: answered (True) when it is a retry or not allowed."""
        existing = self.host.supervisor(msg.replica_id)
        started_by = self.host.requested_by.get(msg.replica_id)
        if existing is not None and not existing.finished:
            if existing.digest == digest and started_by == msg.signer:
                self._reply_status(src, msg.request_id, existing.status())  # a retried start: same answer
                return True
        elif existing is not None and not self._authorized(msg.signer, msg.replica_id):
            # A finished replica's id starts again in its directory (its data): only for whoever started it.
            self._refuse(src, msg, "authorization", f"authorization: {msg.replica_id} was started by another key; "
                                                    f"key {_key(msg.signer)} may not start it again")
            return True
        return False

    def check_bundle(self, data: bytes, key: bytes, signature: bytes) -> Bundle:
        """The bundle ``data``, once its signature is valid, by a key the owner trusts, and it
        parses (a safe archive, a valid manifest); raises :class:`StartRefusal` (check ``bundle``).

        A start checks an inline bundle with it at once, and a bundle named by its blob id once
        its bytes are fetched (:meth:`bundle_fetched`).
        """
        if not verify_bundle(data, signature, key):
            raise StartRefusal("bundle", "bundle: its signature does not match the bundle and the key it names")
        if not self._trusts(key):
            raise StartRefusal("bundle", f"bundle: signed by {_key(key)}, a key this node's owner does not trust")
        result = self._parsed_ahead.get(bundle_digest(data)) if self._parsed_ahead else None
        try:
            if result is None:
                return Bundle.parse(data, max_bytes=self.config.max_bundle_bytes)
            if isinstance(result, BundleError):
                raise result
            return result
        except BundleError as exc:
            raise StartRefusal("bundle", str(exc)) from None

    def plan_replica(self, bundle: Bundle, replica_id: str, bindings: Mapping[str, str]) -> tuple[ReplicaSpec, Demand]:
        """What the replica runs and draws on, once its requirements hold on this node; raises
        :class:`StartRefusal` (check ``requirements`` or ``replica``)."""
        manifest = bundle.manifest
        requirements = manifest.resources.requirements
        if requirements is not None:
            failed = requirements.explain(self.attributes())
            if failed:
                raise StartRefusal("requirements", "requirements: " + "; ".join(failed))
        try:
            spec = manifest.replica_spec(replica_id, bindings=bindings)
        except (ManifestError, ValueError) as exc:
            raise StartRefusal("replica", f"replica: {exc}") from None
        return spec, manifest.demand()

    # -- starts by blob id -----------------------------------------------------------------
    def _start_by_blob(self, src: Address, msg: StartReplica, now: float) -> None:
        """Accept the start and let the replica fetch its bundle (``FetchBundle`` with the blob id
        as its digest); the bundle's checks, requirements and admission follow when it arrives."""
        if self._answered_existing(src, msg, msg.bundle_blob):
            return
        refusal = self.host.fetch_replica(msg.replica_id, msg.bundle_blob, now, requested_by=msg.signer)
        if refusal is not None:
            self._refuse(src, msg, "replica", refusal.reason)
            return
        self._awaiting[msg.replica_id] = msg
        self._note_managed(src, msg)
        status = self.host.status(msg.replica_id)
        assert status is not None
        self._reply_status(src, msg.request_id, status)

    def awaits_bundle(self, replica_id: str) -> bytes | None:
        """The blob id (as sent) of the bundle a start by blob id of ``replica_id`` waits for."""
        msg = self._awaiting.get(replica_id)
        return None if msg is None else msg.bundle_blob

    def bundle_fetched(self, replica_id: str, data: bytes, now: float) -> bool:
        """The bundle of a start by blob id arrived: checked like an inline one (:meth:`check_bundle`,
        :meth:`plan_replica`), then installed and admitted; or the replica fails with the reason.
        True when the replica goes on to install."""
        msg = self._awaiting.pop(replica_id, None)
        if msg is None:
            return False
        supervisor = self.host.supervisor(replica_id)
        if supervisor is None or supervisor.digest != msg.bundle_blob or supervisor.finished:
            return False  # stopped (or replaced) while its bundle was on its way
        try:
            bundle = self.check_bundle(data, msg.bundle_key, msg.bundle_signature)
            _check_service_name(msg, bundle)
            spec, demand = self.plan_replica(bundle, replica_id, msg.bindings)
        except StartRefusal as exc:
            self.refused[exc.check] += 1
            self.host.fetch_failed(replica_id, exc.reason, now)
            return False
        refusal = self.host.bundle_fetched(replica_id, data, now, spec=spec, demand=demand)
        if refusal is not None:
            self.refused["admission"] += 1
            return False
        manifest = bundle.manifest
        self.emit(ReplicaStartAccepted(replica_id, msg.signer, manifest.name, manifest.version))
        return True

    def bundle_unavailable(self, replica_id: str, reason: str, now: float) -> None:
        """The bundle of a start by blob id could not be fetched: the replica fails with ``reason``."""
        if self._awaiting.pop(replica_id, None) is not None:
            self.host.fetch_failed(replica_id, reason, now)

    def _stop(self, src: Address, msg: StopReplica, now: float) -> tuple[str, str] | None:
        if self.host.status(msg.replica_id) is None:
            return "replica", f"replica: no replica {msg.replica_id} on this node"
        if not self._authorized(msg.signer, msg.replica_id):
            return "authorization", f"authorization: key {_key(msg.signer)} did not start {msg.replica_id} and is not an owner key"
        self.host.stop_replica(msg.replica_id, now, f"stop requested by {_key(msg.signer)}")
        self.emit(ReplicaStopAccepted(msg.replica_id, msg.signer))
        status = self.host.status(msg.replica_id)
        assert status is not None
        self._reply_status(src, msg.request_id, status)
        return None

    def _query(self, src: Address, msg: QueryReplica) -> tuple[str, str] | None:
        trusted = self.host.contribution.trusts(msg.signer) or self._authorized(msg.signer, msg.replica_id)
        if not trusted:
            return "trust", f"trust: key {_key(msg.signer)} is not trusted by this node's owner"
        status = self.host.status(msg.replica_id)
        if status is None:
            return "replica", f"replica: no replica {msg.replica_id} on this node"
        self._reply_status(src, msg.request_id, status)
        return None

    def _logs(self, src: Address, msg: FetchLogs, now: float) -> tuple[str, str] | None:
        if self.host.status(msg.replica_id) is None:
            return "replica", f"replica: no replica {msg.replica_id} on this node"
        if not self._authorized(msg.signer, msg.replica_id):
            return "authorization", f"authorization: key {_key(msg.signer)} did not start {msg.replica_id} and is not an owner key"
        if self._logs_waiting.full:
            return "busy", f"busy: {MAX_LOGS_WAITING} log reads are waiting on this node; ask again later"
        token = self._logs_waiting.issue((src, msg.request_id, msg.replica_id), now, self.config.logs_timeout_s)
        self.emit(LogsRequested(token, msg.replica_id, min(msg.max_bytes, self.config.max_log_bytes)))
        return None

    def answer_logs(self, token: int, data: bytes, now: float) -> None:
        """The driver read the logs asked for by ``LogsRequested(token, ...)``."""
        waiting = self._logs_waiting.end(token)
        if waiting is None:
            return
        src, request_id, replica_id = waiting.data
        self.send(src, LogsReply(request_id, replica_id, data[-self.config.max_log_bytes :]))

    # -- timers ----------------------------------------------------------------------------
    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "nonces":
            self._expire_nonces(now + self.wall_clock_offset_s)
            if self._nonces:
                self.set_timer("nonces", now + self.config.window_s)
        elif self._logs_waiting.owns(name):
            waiting = self._logs_waiting.timed_out(name)
            if waiting is not None:
                src, request_id, _ = waiting.data
                self.send(src, Refused(request_id, "busy", "logs: the node did not read the logs in time"))

    def _expire_nonces(self, wall: float) -> None:
        for nonce in [n for n, stale_after in self._nonces.items() if stale_after < wall]:
            del self._nonces[nonce]

    # -- replies ---------------------------------------------------------------------------
    def _reply_status(self, src: Address, request_id: int, status: ReplicaStatus) -> None:
        self.send(src, StatusReply.of(status, request_id=request_id))

    def _refuse(self, src: Address, msg: Request, check: str, reason: str) -> None:
        self.refused[check] += 1
        self.emit(RequestRefused(src, type(msg).__name__, check, reason))
        self.send(src, Refused(msg.request_id, check, reason))


# -- the sending side -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestAnswered:
    request_id: int
    reply: Reply

    @property
    def ok(self) -> bool:
        return not isinstance(self.reply, Refused)


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    request_id: int
    request: str


class RemoteClient(Protocol):
    """The deployer side: builds signed requests, matches their replies, times them out.

    A lost request is not resent as is (the node would refuse it as a replay): the caller
    makes a new one, and a start is idempotent for the same signer and bundle while the replica
    has not finished. A start for a finished replica runs it again (in the same directory): a
    caller retrying a start whose answer was lost should ask for the replica's status first
    when running it twice would matter.
    """

    handles = REPLIES

    def __init__(
        self,
        identity: Identity,
        rng: Rng,
        *,
        timeout_s: float = 10.0,
        wall_clock_offset_s: float = 0.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"RemoteClient timeout_s must be > 0 (got {timeout_s})")
        super().__init__()
        self.identity = identity
        self.rng = rng
        self.timeout_s = timeout_s
        self.wall_clock_offset_s = wall_clock_offset_s
        #: Requests waiting for their reply, from the node they were sent to: the request's kind.
        self._waiting: RequestTracker[str] = RequestTracker(
            self, "request", rng=rng, limit=MAX_CLIENT_REQUESTS, what="remote requests"
        )

    def set_wall_clock_offset(self, offset_s: float) -> None:
        self.wall_clock_offset_s = offset_s

    # -- API -------------------------------------------------------------------------------
    def start(
        self,
        address: Address,
        node_id: int,
        replica_id: str,
        bundle: SignedBundle,
        now: float,
        bindings: Mapping[str, str] | None = None,
        *,
        blob_id: int | None = None,
        service: tuple[int, str] | None = None,
    ) -> int:
        """Start ``bundle`` as ``replica_id``: inline, or with ``blob_id`` by the id of the blob
        that holds its bytes (stored with ``Persistence.put_blob``); the node fetches it. A
        service's manager names the service (``service``: its key and name)."""
        data, blob = bundle.data, b""
        if blob_id is not None:
            data, blob = b"", blob_id.to_bytes(BLOB_ID_BYTES, "big")
        service_key, service_name = (b"", "") if service is None else \
            (service[0].to_bytes(BLOB_ID_BYTES, "big"), service[1])
        key = self.identity.public_key
        return self._ask(address, StartReplica, now, lambda request_id, nonce, timestamp: StartReplica(
            request_id, node_id, key, nonce, timestamp, replica_id,
            data, bundle.public_key, bundle.signature, dict(bindings or {}), bundle_blob=blob, service=service_key,
            service_name=service_name,
        ))  # fmt: skip

    def stop(self, address: Address, node_id: int, replica_id: str, now: float) -> int:
        key = self.identity.public_key
        return self._ask(address, StopReplica, now, lambda request_id, nonce, timestamp: StopReplica(
            request_id, node_id, key, nonce, timestamp, replica_id))  # fmt: skip

    def query(self, address: Address, node_id: int, replica_id: str, now: float) -> int:
        key = self.identity.public_key
        return self._ask(address, QueryReplica, now, lambda request_id, nonce, timestamp: QueryReplica(
            request_id, node_id, key, nonce, timestamp, replica_id))  # fmt: skip

    def fetch_logs(self, address: Address, node_id: int, replica_id: str, now: float, max_bytes: int = MAX_LOG_BYTES) -> int:
        key = self.identity.public_key
        return self._ask(address, FetchLogs, now, lambda request_id, nonce, timestamp: FetchLogs(
            request_id, node_id, key, nonce, timestamp, replica_id, max_bytes))  # fmt: skip

    def make_signed(self, request: Request) -> Request:
        return sign_request(request, self.identity)

    # -- inputs ----------------------------------------------------------------------------
    def receive(self, src: Address, msg: Any, now: float) -> None:
        if self._waiting.reply(msg.request_id, src) is None:
            return
        self.emit(RequestAnswered(msg.request_id, msg))

    def on_timer(self, name: Hashable, now: float) -> None:
        waiting = self._waiting.timed_out(name)
        if waiting is not None:
            self.emit(RequestTimedOut(waiting.request_id, waiting.data))

    # -- helpers ---------------------------------------------------------------------------
    def _ask(self, address: Address, kind: type, now: float, build: Callable[[int, bytes, float], Request]) -> int:
        """Send the request ``build(request_id, nonce, timestamp)`` makes to ``address`` and wait
        for its reply; the request id. Raises ``RequestsFull`` while too many wait already."""
        request_id = self._waiting.issue(kind.__name__, now, self.timeout_s, address=address)
        nonce = self.rng.getrandbits(8 * NONCE_BYTES).to_bytes(NONCE_BYTES, "big")
        try:
            signed = sign_request(build(request_id, nonce, now + self.wall_clock_offset_s), self.identity)
        except BaseException:
            self._waiting.end(request_id)  # the caller's arguments were refused: nothing was sent
            raise
        self.send(address, signed)
        return request_id
