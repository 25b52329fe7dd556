"""The local control API: how the ``p2pdeploy`` command acts on the running node of a data directory.

A ``p2pdeploy join`` node listens on a Unix-domain socket in its data directory
(``control.sock``, mode 0600, so only its owner can talk to it). A connection carries
length-prefixed frames (:mod:`~p2pdeploy.runtime.framing`), each one wire message
(:mod:`p2pdeploy.wire`, tags 37-59 below): the client sends a request, the node answers
with its reply or a :class:`ControlRefusal` naming what was wrong, then the client may send the
next. Requests: :class:`StatusRequest`, :class:`PutRequest`, :class:`GetRequest`,
:class:`LookupRequest`, :class:`BlobPutRequest`, :class:`BlobGetRequest` (replicated
persistence: ``p2pdeploy blob``), :class:`ReplicaRequest` (the node signs a start, stop, status or logs
request with its key and sends it to another node, or to itself; ``p2pdeploy replica``) and the
service deployment requests (:class:`DeployRequest`, :class:`ScaleRequest`, :class:`UndeployRequest`,
:class:`ServiceStatusRequest`, :class:`ServicesRequest`: ``p2pdeploy deploy|scale|undeploy|status
SERVICE|ls|events``, tags 37-39, 46-49 and 59); the
node serves them through its async facade, so the control API makes no protocol decision either.

Each request is declared once, with :func:`control_command` on the coroutine that serves it:
:func:`answer` dispatches by that declaration (:data:`CONTROL_COMMANDS`), and the ``p2pdeploy``
command of the same name (``put``, ``blob get``, ...) asks for it and prints its reply by the
functions it names (:mod:`~p2pdeploy.runtime.control_views`;
:func:`~p2pdeploy.runtime.commands.run_control_command`). A new request is its messages (a
free tag), one declaration and its serving coroutine, and, for a command, its printing and
its parameters in ``cli.py``.

A frame that is not a valid request is answered with a refusal and the connection is closed;
the node counts it (``control_malformed``) and carries on. The socket exists only while a node
runs; one left behind by a killed node is detected (nobody accepts) and replaced by the next
node, and a client that finds no node gets :class:`NoNodeRunning`. Unix socket paths are short
(about 100 bytes); a longer data directory is reached through ``/proc/self/fd`` on Linux.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pdeploy import wire
from p2pdeploy.collective.deployment_messages import ServiceId, ServiceReport
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item
from p2pdeploy.overlay.swim import DetectorStats, Liveness
from p2pdeploy.resource.bundle import MAX_BUNDLE_BYTES, SignedBundle
from p2pdeploy.resource.protocol import MAX_LOG_BYTES, LogsReply, Refused, ReplicaView
from p2pdeploy.resource.protocol import StatusReply as ReplicaStatusReply
from p2pdeploy.runtime import control_views as views
from p2pdeploy.runtime.address import HostPort
from p2pdeploy.runtime.framing import FrameDecoder, FrameTooLarge, frame
from p2pdeploy.runtime.listeners import Connection, ConnectionGuard, RefusalLog, serve_bounded
from p2pdeploy.runtime.state_api import NoPersistence
from p2pdeploy.wire import NodeId, message, record

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

    from p2pdeploy.runtime.node import RuntimeNode

    #: Serves one request on a node: its reply, or an exception naming what was wrong.
    Serve = Callable[[RuntimeNode, Any], Awaitable[Any]]

log = logging.getLogger(__name__)

CONTROL_SOCKET_FILE = "control.sock"
#: Largest blob ``p2pdeploy blob put`` and ``blob get`` carry through the control socket.
MAX_CONTROL_BLOB_BYTES = 64 * 1024 * 1024
#: Largest request or reply frame: a bundle of up to 4 MiB (``p2pdeploy replica start``) or a
#: blob of up to 64 MiB (``p2pdeploy blob``), and its envelope.
CONTROL_LIMIT_BYTES = max(MAX_BUNDLE_BYTES, MAX_CONTROL_BLOB_BYTES) + 1024 * 1024
RECEIVE_BYTES = 65536
#: The failure detector's counters that ``status`` reports (:class:`~p2pdeploy.overlay.swim.DetectorStats`).
DETECTOR_STATS = tuple(f.name for f in fields(DetectorStats))
#: Unix socket paths longer than this are reached through the directory's file descriptor.
UNIX_PATH_MAX_BYTES = 100


# -- messages -------------------------------------------------------------------------------


@message(50)
class StatusRequest:
    """What the node is: id, address, routing table, store, counters, contribution, replicas and
    the failure detector's view."""


@record
class HostedReplica(ReplicaView):
    """One replica the node holds, as ``p2pdeploy status`` lists it."""

    #: The public key that started it.
    requested_by: bytes
    #: What its files (app and data) took at the executor's last measure; None: not measured.
    disk_bytes: int | None = None


@record
class WatchedPeer:
    """A peer the failure detector suspects or holds dead, as ``p2pdeploy status`` lists it."""

    node_id: NodeId
    #: ``suspect`` or ``dead``.
    state: str
    incarnation: int
    #: When the node came to believe it (seconds since the epoch, by the node's clock).
    since_unix_s: float
    #: How long it has believed it, in seconds.
    for_s: float


@record
class DetectorStatus:
    """The failure detector's view (:mod:`p2pdeploy.overlay.swim`): whom it watches, whom it
    suspects or holds dead, its local health and its counters."""

    watched: int
    #: Lifeguard's local health score (0 is healthy; probe timeouts scale by score + 1).
    health: int
    #: The node's own incarnation (raised each time it refutes a suspicion about itself).
    incarnation: int
    suspects: list[WatchedPeer]
    dead: list[WatchedPeer]
    #: ``probes``, ``probes_failed``, ``indirect_requests``, ``nacks_received``, ``refutations``,
    #: ``relayed``, ``gossip_pending``, and the node's ``peers_declared_dead`` / ``peers_recovered``.
    counters: dict[str, int]


@message(51)
class StatusReply:
    node_id: NodeId
    host: str
    port: int
    data_dir: str
    uptime_s: float
    contacts: int
    buckets: int
    stored_items: int
    published_items: int
    restored_contacts: int
    #: Traffic and drops: the runtime's counters, ``kademlia.*`` and the core's ``Layer.kind``.
    counters: dict[str, int]
    #: What the node offers, as a ``[contribution]`` table (``Contribution.to_table``); None: it hosts nothing.
    contribution: dict[str, Any] | None = None
    replicas: list[HostedReplica] = field(default_factory=list)
    replicas_dir: str = ""
    #: What the node holds for the community (``chunks``, ``records``, ``bytes_used``,
    #: ``capacity_bytes``); None: it runs no persistence layer.
    persistence: dict[str, int] | None = None
    #: Where its services reach the state API ("" without one).
    state_url: str = ""
    #: The failure detector's view; None: the node runs none.
    detector: DetectorStatus | None = None


@message(52)
class PutRequest:
    key: NodeId
    item: Item
    #: None: the overlay's default TTL.
    ttl_s: float | None = None


@message(53)
class PutReply:
    key: NodeId
    stored: int
    refusals: list[str]


@message(54)
class GetRequest:
    key: NodeId
    latest: bool = False


@message(55)
class GetReply:
    key: NodeId
    item: Item | None
    ttl_s: float
    hops: int


@message(42)
class BlobPutRequest:
    data: bytes = field(repr=False)
    #: None: the persistence layer's default (3 copies).
    replicas: int | None = None


@message(43)
class BlobPutReply:
    blob_id: NodeId
    size: int
    chunks: int
    #: The fewest copies any of the blob's keys reached.
    replicas: int
    #: Empty when stored; else why not.
    reason: str = ""


@message(44)
class BlobGetRequest:
    blob_id: NodeId


@message(45)
class BlobGetReply:
    blob_id: NodeId
    data: bytes | None = field(repr=False)
    reason: str = ""


@message(56)
class LookupRequest:
    key: NodeId


@message(57)
class LookupReply:
    key: NodeId
    #: The k closest nodes that answered, closest first.
    contacts: list[Contact]
    hops: int
    requests: int


@message(58)
class ControlRefusal:
    """The node could not serve the request; ``reason`` says why and what to do."""

    reason: str


#: What a :class:`ReplicaRequest` may ask of the target node.
REPLICA_OPERATIONS = ("start", "stop", "status", "logs")


@message(40)
class ReplicaRequest:
    """Sign a remote-protocol request with the node's key and send it to the node at ``host:port``.

    ``start`` carries a signed bundle (its bytes, the key that signed it and the signature);
    ``logs`` asks for at most ``max_bytes``. ``node`` is the target's id when the caller knows
    it; otherwise the node pings the target for it.
    """

    operation: str
    host: str
    port: int
    replica_id: str
    bundle: bytes = b""
    bundle_key: bytes = b""
    bundle_signature: bytes = b""
    bindings: dict[str, str] = field(default_factory=dict)
    max_bytes: int = MAX_LOG_BYTES
    node: NodeId | None = None
    #: A start that stores the bundle as a blob first and names its id (``RuntimeNode.remote_start``).
    by_blob: bool = False

    def __post_init__(self) -> None:
        if self.operation not in REPLICA_OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(REPLICA_OPERATIONS)} (got {self.operation!r})")
        if self.operation == "start" and not self.bundle:
            raise ValueError("a start carries a signed bundle")

    @classmethod
    def start(
        cls,
        address: HostPort,
        replica_id: str,
        bundle: SignedBundle,
        bindings: dict[str, str] | None = None,
        *,
        by_blob: bool = False,
    ) -> ReplicaRequest:
        return cls(
            "start", address[0], address[1], replica_id, bundle.data, bundle.public_key, bundle.signature,
            dict(bindings or {}), by_blob=by_blob,
        )  # fmt: skip

    @property
    def address(self) -> HostPort:
        return (self.host, self.port)


@message(41)
class ReplicaAnswer:
    """What the target node answered: a status, logs, or its refusal naming the check that failed."""

    node: NodeId
    host: str
    port: int
    reply: ReplicaStatusReply | LogsReply | Refused


# -- the requests: one declaration each ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """One request the ``p2pdeploy`` command sends to the running node of a data directory.

    Its wire messages and the coroutine that serves it on the node, through the node's facade
    (a refusal is an exception that :func:`answer` turns into a :class:`ControlRefusal`). A
    request with a command of its own (``name``: ``put``, ``blob get``, ...) also says how the
    command's arguments make it (``ask``, by parameter name), how its reply prints (``show``,
    which returns the exit status) and, for ``--json``, the reply as one JSON object
    (``to_json``); the printing lives in :mod:`~p2pdeploy.runtime.control_views`, the
    command's parameters in ``cli.py``.
    """

    request: type
    reply: type
    serve: Serve
    name: str | None = None
    ask: Callable[[Mapping[str, Any]], Any] | None = None
    show: Callable[[Any, Mapping[str, Any], Console], int] | None = None
    to_json: Callable[[Any], dict[str, Any]] | None = None


#: Every control request by its request class, in the order they are declared.
CONTROL_COMMANDS: dict[type, ControlCommand] = {}


def control_command(
    request: type,
    reply: type,
    *,
    name: str | None = None,
    ask: Callable[[Mapping[str, Any]], Any] | None = None,
    show: Callable[[Any, Mapping[str, Any], Console], int] | None = None,
    to_json: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[Serve], Serve]:
    """Declare ``request``, answered with ``reply``, as served by the decorated coroutine
    (the other arguments: :class:`ControlCommand`)."""

    def declare(serve: Serve) -> Serve:
        if request in CONTROL_COMMANDS:
            raise ValueError(f"{request.__name__} is already declared")
        CONTROL_COMMANDS[request] = ControlCommand(request, reply, serve, name, ask, show, to_json)
        return serve

    return declare


def command_named(name: str) -> ControlCommand:
    """The control request behind the command ``name`` (``status``, ``blob put``, ...)."""
    for command in CONTROL_COMMANDS.values():
        if command.name == name:
            return command
    raise KeyError(f"no control request is declared for the command {name!r}")


@control_command(
    StatusRequest, StatusReply, name="status", ask=lambda arguments: StatusRequest(),
    show=views.show_status, to_json=views.status_to_json,
)  # fmt: skip
async def serve_status(node: RuntimeNode, request: StatusRequest) -> StatusReply:
    return status_of(node)


@control_command(
    PutRequest, PutReply, name="put", show=views.show_put,
    ask=lambda arguments: PutRequest(views.key_of_name(arguments["name"]), Item(arguments["value"]), arguments["ttl_s"]),
)  # fmt: skip
async def serve_put(node: RuntimeNode, request: PutRequest) -> PutReply:
    item, ttl_s = request.item, request.ttl_s
    event = await node.query(lambda overlay, now: overlay.put_item(request.key, item, now, ttl_s))
    return PutReply(request.key, event.stored, list(event.refusals))


@control_command(
    GetRequest, GetReply, name="get", show=views.show_get,
    ask=lambda arguments: GetRequest(views.key_of_name(arguments["name"])),
)  # fmt: skip
async def serve_get(node: RuntimeNode, request: GetRequest) -> GetReply:
    event = await node.query(lambda overlay, now: overlay.get(request.key, now, latest=request.latest))
    return GetReply(request.key, event.item, max(event.ttl_s, 0.0), event.hops)


@control_command(
    LookupRequest, LookupReply, name="lookup", show=views.show_lookup,
    ask=lambda arguments: LookupRequest(views.key_of_name(arguments["name"])),
)  # fmt: skip
async def serve_lookup(node: RuntimeNode, request: LookupRequest) -> LookupReply:
    event = await node.query(lambda overlay, now: overlay.lookup(request.key, now))
    return LookupReply(request.key, list(event.closest), event.hops, event.requests)


@control_command(
    BlobPutRequest, BlobPutReply, name="blob put", show=views.show_blob_put,
    ask=lambda arguments: BlobPutRequest(
        views.read_blob_file(arguments["path"], MAX_CONTROL_BLOB_BYTES), arguments["replicas"]
    ),
)  # fmt: skip
async def serve_blob_put(node: RuntimeNode, request: BlobPutRequest) -> BlobPutReply:
    if len(request.data) > MAX_CONTROL_BLOB_BYTES:
        raise ValueError(f"a blob through the control socket is at most {MAX_CONTROL_BLOB_BYTES} bytes")
    stored = await node.persistence.put_blob(request.data, replicas=request.replicas)
    return BlobPutReply(stored.blob_id, stored.size, stored.chunks, stored.replicas, stored.reason)


@control_command(
    BlobGetRequest, BlobGetReply, name="blob get", show=views.show_blob_get,
    ask=lambda arguments: BlobGetRequest(views.blob_id_of(arguments["blob_id"])),
)  # fmt: skip
async def serve_blob_get(node: RuntimeNode, request: BlobGetRequest) -> BlobGetReply:
    fetched = await node.persistence.fetch_blob(request.blob_id)
    if fetched.data is not None and len(fetched.data) > MAX_CONTROL_BLOB_BYTES:
        return BlobGetReply(request.blob_id, None, f"the blob has {len(fetched.data)} bytes, over the "
                            f"control socket's {MAX_CONTROL_BLOB_BYTES}; fetch it with the library")
    return BlobGetReply(request.blob_id, fetched.data, fetched.reason)


@control_command(ReplicaRequest, ReplicaAnswer)  # its commands are ``replica start|stop|status|logs``
async def serve_replica_request(node: RuntimeNode, request: ReplicaRequest) -> ReplicaAnswer:
    """Send ``request`` from ``node`` (signed with its key) and wrap the target's reply.

    Raises :class:`~p2pdeploy.runtime.node.PingTimeout` when the target does not answer a ping
    for its id, :class:`~p2pdeploy.runtime.node.RemoteTimeout` when it does not answer the request.
    """
    address = await node.resolve(request.address)
    node_id = request.node if request.node is not None else await node.node_id_at(address)
    replica_id = request.replica_id
    if request.operation == "start":
        bundle = SignedBundle(request.bundle, request.bundle_key, request.bundle_signature)
        reply = await node.remote_start(
            address, replica_id, bundle, bindings=dict(request.bindings), node_id=node_id, by_blob=request.by_blob
        )
    elif request.operation == "stop":
        reply = await node.remote_stop(address, replica_id, node_id=node_id)
    elif request.operation == "status":
        reply = await node.remote_query(address, replica_id, node_id=node_id)
    else:
        reply = await node.remote_logs(address, replica_id, request.max_bytes, node_id=node_id)
    return ReplicaAnswer(node_id, address[0], address[1], reply)


# -- service deployment: deploy, scale, undeploy, status, ls ------------------------------


@message(46)
class DeployRequest:
    """Deploy a signed bundle as the service ``NAME@KEY``: the manifest's name, owned by the
    node's key (``p2pdeploy deploy``); ``replicas`` or ``availability`` override the manifest."""

    bundle: bytes = field(repr=False)
    bundle_key: bytes
    bundle_signature: bytes
    replicas: int | None = None
    availability: float | None = None

    @classmethod
    def of(cls, bundle: SignedBundle, *, replicas: int | None = None, availability: float | None = None) -> DeployRequest:
        return cls(bundle.data, bundle.public_key, bundle.signature, replicas, availability)

    @property
    def signed_bundle(self) -> SignedBundle:
        return SignedBundle(self.bundle, self.bundle_key, self.bundle_signature)


@message(47)
class DeployReply:
    """How a deploy, scale or undeploy ended: ``ok`` when the service's record was written
    (``version``, its generation), else ``reason`` says why not."""

    service: str
    action: str
    ok: bool
    version: int
    reason: str = ""


@message(48)
class ScaleRequest:
    """Change the replica count or the availability target of ``service`` (``NAME`` of the
    node's key, or ``NAME@OWNER`` with the node's key as owner)."""

    service: str
    replicas: int | None = None
    availability: float | None = None


@message(49)
class UndeployRequest:
    """Stop every replica of ``service`` (only its owner's node may)."""

    service: str


@message(59)
class ServiceStatusRequest:
    """What the manager of ``service`` (``NAME`` of the node's key, or ``NAME@OWNER``) wants and sees."""

    service: str


@message(37)
class ServiceStatusReply:
    """The manager's report on ``service`` (``NAME@OWNER``); None when no member of its group
    answered, ``reason`` saying why."""

    service: str
    report: ServiceReport | None
    reason: str = ""


@message(38)
class ServicesRequest:
    """The names of ``owner``'s services (empty: the node's key's)."""

    owner: bytes = b""


@message(39)
class ServicesReply:
    owner: bytes
    names: list[str]


class NotOwner(ValueError):
    """A change to a service asked of a node whose key does not own it."""


def owned_service(service: str, node_key: bytes) -> ServiceId:
    """``service`` (``NAME`` or ``NAME@OWNER``) when ``node_key`` owns it; :class:`NotOwner`
    saying whose it is otherwise (only the owner's key can write the service's record)."""
    parsed = ServiceId.parse(service, default_owner=node_key)
    if parsed.owner != node_key:
        raise NotOwner(
            f"service {parsed.short()}… is owned by key {parsed.owner.hex()[:12]}…; this node's key is "
            f"{node_key.hex()[:12]}…: only the owner may update, scale or undeploy it"
        )
    return parsed


def _deploy_reply(event: Any) -> DeployReply:
    return DeployReply(event.service, event.action, event.ok, event.version, event.reason)


@control_command(DeployRequest, DeployReply)  # `p2pdeploy deploy` sends it itself (it then waits)
async def serve_deploy(node: RuntimeNode, request: DeployRequest) -> DeployReply:
    finished = await node.deploy(request.signed_bundle, replicas=request.replicas, availability=request.availability)
    return _deploy_reply(finished)


@control_command(ScaleRequest, DeployReply)
async def serve_scale(node: RuntimeNode, request: ScaleRequest) -> DeployReply:
    service = owned_service(request.service, node.identity.public_key)
    finished = await node.scale(service.name, replicas=request.replicas, availability=request.availability)
    return _deploy_reply(finished)


@control_command(UndeployRequest, DeployReply)
async def serve_undeploy(node: RuntimeNode, request: UndeployRequest) -> DeployReply:
    service = owned_service(request.service, node.identity.public_key)
    return _deploy_reply(await node.undeploy(service.name))


@control_command(ServiceStatusRequest, ServiceStatusReply)
async def serve_service_status(node: RuntimeNode, request: ServiceStatusRequest) -> ServiceStatusReply:
    service = node.service_id(request.service)
    finished = await node.service_status(service)
    return ServiceStatusReply(str(service), finished.report, finished.reason)


@control_command(ServicesRequest, ServicesReply)
async def serve_services(node: RuntimeNode, request: ServicesRequest) -> ServicesReply:
    owner = request.owner or node.identity.public_key
    if len(owner) != 32:
        raise ValueError(f"an owner is a 32-byte public key, 64 hex digits (got {len(owner)} bytes)")
    return ServicesReply(owner, await node.services(owner))


def status_of(node: RuntimeNode) -> StatusReply:
    overlay = node.overlay
    counters = {key: int(value) for key, value in node.counters.items()}
    counters.update({f"kademlia.{key}": value for key, value in overlay.counters.items()})
    counters.update(node.core_counters())
    persistence = None
    try:
        layer = node.persistence.layer
    except NoPersistence:
        layer = None
    if layer is not None:
        counters.update({f"persistence.{key}": int(value) for key, value in layer.counters.items()})
        store = layer.store
        persistence = {
            "chunks": len(store.chunk_infos()),
            "records": len(store.record_keys()),
            "bytes_used": store.used_bytes(),
            "capacity_bytes": int(getattr(store, "capacity_bytes", 0)),
        }
    host, port = node.address
    uptime_s = 0.0 if node.started_at is None else trio.current_time() - node.started_at
    contribution = node.contribution
    requested_by = node.replica_host.requested_by if contribution is not None else {}
    return StatusReply(
        node_id=node.node_id,
        host=host,
        port=port,
        data_dir="" if node.data_dir is None else os.fspath(node.data_dir),
        uptime_s=uptime_s,
        contacts=len(overlay.table),
        buckets=len(overlay.table.buckets),
        stored_items=len(overlay.store),
        published_items=len(overlay.published),
        restored_contacts=node.restored_contacts,
        counters=counters,
        contribution=None if contribution is None else contribution.to_table(),
        replicas=[
            HostedReplica.of(r, requested_by=requested_by.get(r.replica_id, b""),
                             disk_bytes=None if node.executor is None else node.executor.disk_bytes(r.replica_id))
            for r in node.hosted_replicas()
        ],
        replicas_dir="" if node.replicas_dir is None else os.fspath(node.replicas_dir),
        persistence=persistence,
        state_url="" if node.state_server is None else node.state_server.url,
        detector=detector_status_of(node),
    )


def detector_status_of(node: RuntimeNode) -> DetectorStatus | None:
    """The failure detector under the node's overlay, as a :class:`DetectorStatus` (None: none)."""
    detector = node.overlay.detector
    if detector is None:
        return None
    now = trio.current_time()
    wall_offset_s = time.time() - now

    def listed(state: Liveness) -> list[WatchedPeer]:
        views = sorted(detector.views((state,)), key=lambda view: (view.since, view.node_id))
        return [
            WatchedPeer(NodeId(view.node_id), view.state.value, view.incarnation, view.since + wall_offset_s,
                        max(now - view.since, 0.0))
            for view in views
        ]  # fmt: skip

    counters = {name: int(getattr(detector.stats, name)) for name in DETECTOR_STATS}
    counters["gossip_pending"] = detector.gossip_pending()
    for name in ("peers_declared_dead", "peers_recovered"):
        counters[name] = int(node.counters.get(name, 0))
    return DetectorStatus(
        watched=detector.watch_count(),
        health=detector.health,
        incarnation=detector.incarnation,
        suspects=listed(Liveness.suspect),
        dead=listed(Liveness.dead),
        counters=counters,
    )


#: The request classes, for the server's check and its refusal naming them.
REQUESTS = tuple(CONTROL_COMMANDS)


# -- errors ---------------------------------------------------------------------------------


class ControlError(Exception):
    """The control API could not do what was asked (the message says why)."""


class NoNodeRunning(ControlError):
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        super().__init__(
            f"no node is running with data dir {os.fspath(data_dir)}; "
            f"start one with `p2pdeploy join --data-dir {os.fspath(data_dir)}`"
        )
        self.data_dir = data_dir


class NodeAlreadyRunning(ControlError):
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        super().__init__(
            f"a node is already running with data dir {os.fspath(data_dir)}; "
            "stop it first or give this one another --data-dir"
        )
        self.data_dir = data_dir


class ControlRequestRefused(ControlError):
    """The node answered with a :class:`ControlRefusal`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- socket paths ---------------------------------------------------------------------------


def control_socket_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / CONTROL_SOCKET_FILE


@contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """An address the kernel accepts for ``path`` (a short alias through the directory's fd)."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= UNIX_PATH_MAX_BYTES or not os.path.isdir("/proc/self/fd"):
        yield text
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


# -- the server -----------------------------------------------------------------------------


class ControlSocket:
    """The bound, listening control socket of one node; :meth:`close` removes its file."""

    def __init__(self, sock: stdlib_socket.socket, path: Path, data_dir: Path) -> None:
        self.path = path
        self.data_dir = data_dir
        self._socket = trio.socket.from_stdlib_socket(sock)
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)

    @classmethod
    async def bind(cls, data_dir: str | os.PathLike[str]) -> ControlSocket:
        """Listen on ``DATA_DIR/control.sock`` (mode 0600); raises :class:`NodeAlreadyRunning`
        when another node answers there. A socket file left by a killed node is replaced."""
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = control_socket_path(directory)
        await _remove_stale_socket(path, directory)
        sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            with _unix_address(path) as address:
                old_umask = os.umask(0o177)  # the file is created 0600: no window where others may connect
                try:
                    sock.bind(address)
                finally:
                    os.umask(old_umask)
            os.chmod(path, 0o600)
            sock.listen(16)
            return cls(sock, path, directory)
        except BaseException:
            sock.close()
            raise

    async def serve(self, node: RuntimeNode, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve requests for ``node`` until cancelled; the socket file is removed on the way out.
        Connections are bounded by ``RuntimeConfig.control`` (counted as ``control_*``)."""
        guard = ConnectionGuard("control_connections", node.config.control, node.counters)
        try:
            await serve_bounded(trio.SocketListener(self._socket), partial(_serve_connection, node), guard,
                                RefusalLog(log), task_status=task_status)
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket and remove its file (unless another node has replaced it since)."""
        self._socket.close()
        with suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)


async def _remove_stale_socket(path: Path, data_dir: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; remove it and start the node again")
    try:
        stream = await _connect(path, data_dir)
    except NoNodeRunning:
        log.info("removing the control socket left by a node that is gone: %s", path)
        with suppress(FileNotFoundError):
            os.unlink(path)
        return
    await trio.aclose_forcefully(stream)
    raise NodeAlreadyRunning(data_dir)


async def _serve_connection(node: RuntimeNode, stream: trio.SocketStream, connection: Connection) -> None:
    decoder = FrameDecoder(CONTROL_LIMIT_BYTES)
    while True:
        data = await connection.receive_some(stream, RECEIVE_BYTES)
        if not data:
            return
        decoder.feed(data)
        while True:
            try:
                payload = decoder.next_frame()
            except FrameTooLarge as exc:
                node.counters["control_malformed"] += 1
                await _reply(stream, ControlRefusal(f"request refused: {exc}"))
                return
            if payload is None:
                if decoder.expected_bytes is not None:
                    connection.begin_message()
                break
            connection.completed_message()
            connection.busy = True
            request = wire.decode(payload, CONTROL_LIMIT_BYTES)
            if isinstance(request, wire.DecodeError):
                node.counters["control_malformed"] += 1
                await _reply(stream, ControlRefusal(f"malformed request ({request.kind}: {request.detail})"))
                return
            if not isinstance(request, REQUESTS):
                node.counters["control_malformed"] += 1
                names = ", ".join(cls.__name__ for cls in REQUESTS)
                await _reply(stream, ControlRefusal(f"{type(request).__name__} is not a request; send one of {names}"))
                return
            node.counters["control_requests"] += 1
            await _reply(stream, await answer(node, request))
            connection.busy = False


async def _reply(stream: trio.SocketStream, reply: Any) -> None:
    await stream.send_all(frame(wire.encode(reply, CONTROL_LIMIT_BYTES)))


async def answer(node: RuntimeNode, request: Any) -> Any:
    """The reply to one control request, served through the node's facade by its declaration."""
    from p2pdeploy.runtime.node import (
        BundleNotStored,
        NodeNotRunning,
        NoDeployment,
        NoOverlay,
        NoRemoteClient,
        PingTimeout,
        RemoteTimeout,
    )

    command = CONTROL_COMMANDS.get(type(request))
    if command is None:
        raise AssertionError(f"unhandled request {request!r}")
    try:
        return await command.serve(node, request)
    except (ValueError, TypeError, NodeNotRunning, NoOverlay, NoRemoteClient, NoPersistence, BundleNotStored,
            PingTimeout, RemoteTimeout, NoDeployment) as exc:
        node.counters["control_refused"] += 1
        return ControlRefusal(str(exc))


# -- the client -----------------------------------------------------------------------------


async def _connect(path: Path, data_dir: str | os.PathLike[str]) -> trio.SocketStream:
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        try:
            with _unix_address(path) as address:
                await sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NoNodeRunning(data_dir) from None
        except PermissionError:
            raise ControlError(
                f"cannot reach the node of data dir {os.fspath(data_dir)}: permission denied on {path} "
                "(it runs as another user?)"
            ) from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class ControlClient:
    """One connection to a node's control socket; requests are answered in order."""

    def __init__(self, stream: trio.SocketStream, data_dir: str | os.PathLike[str]) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(CONTROL_LIMIT_BYTES)
        self.data_dir = data_dir

    async def request(self, request: Any) -> Any:
        """Send ``request``; its reply. A refusal raises :class:`ControlRequestRefused`."""
        try:
            await self._stream.send_all(frame(wire.encode(request, CONTROL_LIMIT_BYTES)))
            payload = await self._next_frame()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, FrameTooLarge) as exc:
            raise ControlError(f"the node of data dir {os.fspath(self.data_dir)} broke the connection: {exc}") from None
        reply = wire.decode(payload, CONTROL_LIMIT_BYTES)
        if isinstance(reply, wire.DecodeError):
            raise ControlError(f"the node sent a malformed reply ({reply.kind}: {reply.detail})")
        if isinstance(reply, ControlRefusal):
            raise ControlRequestRefused(reply.reason)
        return reply

    async def _next_frame(self) -> bytes:
        while (payload := self._decoder.next_frame()) is None:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ControlError(
                    f"the node of data dir {os.fspath(self.data_dir)} closed the connection without answering "
                    "(it is stopping?)"
                )
            self._decoder.feed(data)
        return payload

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def open_control(data_dir: str | os.PathLike[str]) -> AsyncIterator[ControlClient]:
    """A connection to the node running with ``data_dir``; raises :class:`NoNodeRunning`."""
    stream = await _connect(control_socket_path(data_dir), data_dir)
    client = ControlClient(stream, data_dir)
    try:
        yield client
    finally:
        await trio.aclose_forcefully(stream)


async def control_request(data_dir: str | os.PathLike[str], request: Any) -> Any:
    """One request to the node running with ``data_dir``, on a connection of its own."""
    async with open_control(data_dir) as client:
        return await client.request(request)
