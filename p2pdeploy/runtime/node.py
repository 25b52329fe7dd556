"""The trio driver of one node: real sockets and real time in, core calls out, and an async facade.

A :class:`RuntimeNode` owns a :class:`~p2pdeploy.runtime.transport.Transport` (one UDP socket
and one TCP listener on the same address) and hosts one sans-I/O core, a
:class:`p2pdeploy.core.Stack` built by :mod:`p2pdeploy.node`. It follows the driver
contract of ``core.py``: after every input (a datagram, a frame, a timer, an API call) it
drains the core's events, then its messages, then reads its next deadline and re-arms its one
timer. Core times are ``trio.current_time()`` seconds. It makes no protocol decision: which
peer to ping, when a ping is lost and what an RTT is are the core's.

The facade turns core events into awaitable results: :meth:`RuntimeNode.request` runs a core
API call and waits for the event that finishes it, which is how ``ping`` and the overlay's
``lookup``, ``put`` and ``get`` are written (a later layer's ``deploy`` will be too). Use it
through :func:`open_node`::

    async with open_node(listen=("127.0.0.1", 0), data_dir=path, bootstrap=[seed]) as node:
        rtt_s = await node.ping(("127.0.0.1", 7400))
        await node.wait_joined()
        replicas = await node.put(key_id(b"greeting"), b"hello")
        value = await node.get(key_id(b"greeting"))

With a data directory the node keeps its routing table there (``routing.cbor``, CBOR written
atomically after the join, every ``snapshot_interval_s`` and at shutdown) and restores it on
start, so a restarted node rejoins through its old contacts even without ``bootstrap``. The
overlay's values (those it holds and those it published) are in ``overlay.sqlite3`` there
(:mod:`p2pdeploy.runtime.overlay_store`): a restarted node serves them and keeps republishing.
The node's uptime history (:mod:`p2pdeploy.fabric.uptime`) is in ``uptime.sqlite3``
(:mod:`p2pdeploy.runtime.uptime_store`): a session begins when the node starts, a heartbeat
every ``uptime_heartbeat_interval_s`` extends it (a crash loses at most one interval), and the
availability it yields is advertised in the node's description.

Given a :class:`~p2pdeploy.fabric.contribution.Contribution` the node also hosts replicas: its
core holds a :class:`~p2pdeploy.fabric.replicas.ReplicaHost` and the remote protocol's node side
(the contribution clamped to the machine it probes at start; it probes again every
``machine_probe_interval_s`` so that requirements see free memory and load as they are), and
the node runs a :class:`~p2pdeploy.runtime.executor.RealExecutor` in its nursery, wired to the
core by :class:`~p2pdeploy.runtime.exec_local.ReplicaWiring`: executor commands among the core's
events go to the executor, its reports come back as core input. Replicas live in
``DATA_DIR/replicas`` (``RuntimeConfig.executor`` says otherwise). When the node stops, its
replicas are stopped first (TERM, then KILL after their grace period), and whatever is left is
killed by the executor: no process outlives the node. Any node can also send signed requests to
another node's replicas (``remote_start``, ``remote_query``, ``remote_logs``, ``remote_stop``)::

    async with open_node(contribution=Contribution(cpu_cores=2, trusted_keys=frozenset({key}))) as node:
        ...
    async with open_node(identity=deployer) as client:
        reply = await client.remote_start(address, "hello-1", bundle_from_directory(path).sign(deployer))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import socket as stdlib_socket
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import trio

from p2pdeploy import wire
from p2pdeploy.collective.bundles import BundleFetcher, BundleToCheck
from p2pdeploy.collective.deployment import DeployFinished, Deployment, ServicesListed, StatusFinished
from p2pdeploy.collective.deployment_messages import Decision, ServiceId
from p2pdeploy.collective.persistence import DurableStore, HandedOff, Persistence, PersistenceConfig
from p2pdeploy.collective.prospector import (
    AggregateFinished,
    FoundNode,
    ProspectFinished,
    Prospector,
    ProspectorConfig,
)
from p2pdeploy.collective.pubsub import Delivered, PubSub
from p2pdeploy.collective.stateapi import StateError
from p2pdeploy.core import Stack, require_at_least, require_positive
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import ExecutorReport, ProcessSpec
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaStatus
from p2pdeploy.fabric.uptime import UptimeHistory
from p2pdeploy.node import CoreContext, LayersFactory, build_core, default_layers
from p2pdeploy.overlay.broadcast import Broadcast, BroadcastCompleted
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import (
    GetFinished,
    Joined,
    Kademlia,
    KademliaConfig,
    LookupFinished,
    PutFinished,
)
from p2pdeploy.overlay.ping import PeerSeen, Ping, PingProtocol, PingTimedOut, PongReceived
from p2pdeploy.overlay.routing import ID_SPACE, Contact
from p2pdeploy.overlay.storage import Item, OverlayStore
from p2pdeploy.overlay.swim import DetectorConfig, PeerDeclaredDead, PeerRecovered
from p2pdeploy.resource.bundle import Bundle, BundleError, SignedBundle, read_member
from p2pdeploy.resource.description import NodeDescription
from p2pdeploy.resource.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SERVICE_VARIABLE
from p2pdeploy.resource.protocol import (
    MAX_LOG_BYTES,
    RemoteClient,
    RemoteConfig,
    RemoteControl,
    Reply,
    RequestAnswered,
    RequestTimedOut,
)
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.exec_local import ReplicaWiring
from p2pdeploy.runtime.executor import RealExecutor, RealExecutorConfig
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.listeners import ListenerLimits, RefusalLog
from p2pdeploy.runtime.overlay_store import open_overlay_store
from p2pdeploy.runtime.probe import probe_machine
from p2pdeploy.runtime.snapshot import ROUTING_SNAPSHOT_FILE, read_bounded, write_file_atomically
from p2pdeploy.runtime.state_api import (
    PersistenceClient,
    StateServer,
    default_state_api_limits,
    open_store,
    replica_namespace,
)
from p2pdeploy.runtime.transport import Transport, TransportConfig, path_for
from p2pdeploy.runtime.uptime_store import UptimeStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class PingTimeout(TimeoutError):
    """No pong came back: the ping protocol gave up on it, or the caller's ``timeout_s`` ran out."""

    def __init__(self, address: HostPort, waited_s: float) -> None:
        super().__init__(f"no pong from {format_host_port(address)} after {waited_s:.2f} s")
        self.address = address
        self.waited_s = waited_s


class NodeNotRunning(RuntimeError):
    """The facade was used before the node started or after it stopped."""


class NoOverlay(RuntimeError):
    """The overlay facade was used on a node whose layers include no Kademlia overlay."""


class NoRemoteClient(RuntimeError):
    """The remote facade was used on a node whose layers include no RemoteClient."""


class NotHosting(RuntimeError):
    """The replica facade was used on a node that hosts no replicas (it was given no contribution)."""


class BundleNotStored(RuntimeError):
    """A start by blob id could not store its bundle: no node (not even this one) took a copy."""


class NoDeployment(RuntimeError):
    """The deployment facade was used on a node whose layers include no Deployment layer."""


class RemoteTimeout(TimeoutError):
    """The node asked for a replica operation did not answer within the remote protocol's timeout."""

    def __init__(self, address: HostPort, request: str, waited_s: float) -> None:
        super().__init__(f"{format_host_port(address)} did not answer {request} within {waited_s:g} s")
        self.address = address
        self.request = request
        self.waited_s = waited_s


#: The events that finish an overlay query (they carry the ``query_id`` the call returned).
OVERLAY_RESULTS = (LookupFinished, GetFinished, PutFinished, Joined)
#: Starts with an inline bundle waiting for the worker that parses bundles; more are dropped.
MAX_BUNDLES_PARSING = 4


def check_key(key: object) -> int:
    """``key`` if it is an overlay key (a 160-bit int); a clear error otherwise."""
    if not isinstance(key, int) or isinstance(key, bool):
        raise TypeError(
            f"an overlay key is a 160-bit int (got {type(key).__name__}); "
            "make one from a name with p2pdeploy.api.key_for('name') or key_id(b'name')"
        )
    if not 0 <= key < ID_SPACE:
        raise ValueError(f"an overlay key must be in [0, 2**160) (got {key})")
    return key


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Tuning knobs of a node (configuration, never private attributes poked from outside)."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    #: Events buffered per subscriber; when a subscriber falls behind, newer events are dropped and counted.
    event_buffer: int = 1024
    #: Pings sent to each bootstrap address before giving up on it.
    join_attempts: int = 3
    #: Parameters of the Kademlia overlay layer (k, alpha, timeouts, republish intervals, ...).
    kademlia: KademliaConfig = field(default_factory=KademliaConfig)
    #: How often the routing table is saved to the data directory (also after the join and at shutdown).
    snapshot_interval_s: float = 60.0
    #: How often the node records that it is up in its uptime history (and advertises its
    #: availability again): a crash loses at most this much counted uptime.
    uptime_heartbeat_interval_s: float = 60.0
    #: Where and how a hosting node runs replicas; ``None``: in ``DATA_DIR/replicas`` (a temporary
    #: directory for a node without a data directory) with the executor's defaults.
    executor: RealExecutorConfig | None = None
    #: The node side of the remote protocol (replay window, log sizes, bundle cap).
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    #: How long this node waits for another node's answer to a signed replica request.
    remote_timeout_s: float = 10.0
    #: How often a hosting node probes its machine again (free memory, disk, load: what
    #: requirements see) and both sides of the remote protocol re-read the wall clock.
    machine_probe_interval_s: float = 30.0
    #: When the node stops, its replicas get their own stop sequence (TERM, grace, KILL) plus this.
    replica_stop_slack_s: float = 2.0
    #: Parameters of the resource prospector (update interval, summaries, query bounds).
    prospector: ProspectorConfig = field(default_factory=ProspectorConfig)
    #: Parameters of replicated persistence (chunk size, replicas, repair period, quorum size).
    persistence: PersistenceConfig = field(default_factory=PersistenceConfig)
    #: Parameters of the failure detector (its defaults suit loopback and LAN; scale the
    #: period and timeouts up together on a WAN).
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    #: When the node stops, how long it may spend handing the keys it holds to the nodes now
    #: responsible for them (repair on the others covers what is not handed off in time).
    persistence_leave_s: float = 30.0
    #: Bounds on the state API's connections (services on this machine, and anyone else on it).
    state_api: ListenerLimits = field(default_factory=default_state_api_limits)
    #: Bounds on the control socket's connections. Its file is the owner's alone (mode 0600), so
    #: its buffers are not reserved: a request may carry a 64 MiB blob.
    control: ListenerLimits = field(default_factory=lambda: ListenerLimits(
        max_connections=32, max_connections_per_source=32, header_timeout_s=60.0, idle_timeout_s=600.0,
        message_timeout_s=60.0))

    def __post_init__(self) -> None:
        require_positive(self, "", "snapshot_interval_s", "remote_timeout_s", "machine_probe_interval_s",
                         "persistence_leave_s", "uptime_heartbeat_interval_s")
        require_at_least(self, "", 0, "replica_stop_slack_s")


@dataclass(eq=False, slots=True)
class _Waiter:
    finished: Callable[[Any], bool]
    done: trio.Event = field(default_factory=trio.Event)
    event: Any = None


class RuntimeNode:
    """One node on the real network. Build it with :func:`open_node`."""

    def __init__(
        self,
        identity: Identity,
        *,
        seed: int | None = None,
        config: RuntimeConfig | None = None,
        identity_created: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        contribution: Contribution | None = None,
    ) -> None:
        self.identity = identity
        self.identity_created = identity_created
        self.config = config or RuntimeConfig()
        #: Where durable state lives (the routing snapshot); None keeps everything in memory.
        self.data_dir = None if data_dir is None else Path(data_dir).absolute()
        #: Seeded once here; every layer draws from it (``random.Random(None)`` seeds from the OS).
        self.rng = random.Random(seed)
        #: What the runtime counted: traffic by path, and inputs dropped by kind
        #: (``malformed``, ``oversized``, ``unknown_type``, ``bad_version``, ``bad_hello``, ...).
        self.counters: Counter[str] = Counter()
        #: Results of the join: bootstrap address -> RTT in seconds, or None when it did not answer.
        self.bootstrap_rtts: dict[HostPort, float | None] = {}
        #: The overlay's ``Joined`` event once the join finished (None before, or without an overlay).
        self.overlay_joined: Joined | None = None
        #: Contacts loaded from the routing snapshot in the data directory when the node started.
        self.restored_contacts = 0
        #: ``trio.current_time()`` when the node started serving.
        self.started_at: float | None = None
        #: What the owner offers, as asked; the node hosts what :attr:`contribution` says (clamped).
        self.requested_contribution = contribution
        #: What the last probe found of this machine (hosting nodes probe at start and periodically).
        self.machine: Machine | None = None
        #: The executor of a hosting node while it runs.
        self.executor: RealExecutor | None = None
        #: The state API served to this node's services while it runs (with a persistence layer).
        self.state_server: StateServer | None = None
        self._left = False
        self._wiring: ReplicaWiring | None = None
        #: The persistence and overlay stores this node opened (closed when it stops).
        self._store: DurableStore | None = None
        self._overlay_store: OverlayStore | None = None
        #: This node's sessions (kept in the data directory when it has one): its availability.
        self.uptime = UptimeHistory()
        self._uptime_store: UptimeStore | None = None
        self._temporary_dir: Path | None = None
        self._joined = trio.Event()
        #: One save at a time: saves share the temporary file they write before renaming it.
        self._snapshot_lock = trio.Lock()
        self._core: Stack | None = None
        self._transport: Transport | None = None
        self._address: HostPort | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._waiters: set[_Waiter] = set()
        self._subscribers: list[trio.MemorySendChannel[Any]] = []
        #: Rate-limited lines about refused input and failures a flood could repeat.
        self._refusals = RefusalLog(log)
        self._nursery: trio.Nursery | None = None
        #: Starts whose inline bundle a worker thread is parsing (or waits to), one at a time.
        self._bundles_parsing = 0
        self._bundle_parser = trio.CapacityLimiter(1)

    # -- identity and state ------------------------------------------------------------------
    @property
    def node_id(self) -> int:
        return self.identity.node_id

    @property
    def node_id_hex(self) -> str:
        return f"{self.identity.node_id:040x}"

    @property
    def address(self) -> HostPort:
        """The ``(host, port)`` this node listens on, for UDP and TCP alike."""
        if self._address is None:
            raise NodeNotRunning("the node has not started; use it inside `async with open_node(...)`")
        return self._address

    @property
    def core(self) -> Stack:
        if self._core is None:
            raise NodeNotRunning("the node is not running; use it inside `async with open_node(...)`")
        return self._core

    @property
    def peers(self) -> dict[HostPort, int | None]:
        """Peers heard from so far: address -> node id."""
        return dict(self.core.layer(PingProtocol).peers)

    @property
    def overlay(self) -> Kademlia:
        """The node's Kademlia layer (read its state; change it only through the facade)."""
        try:
            return self.core.layer(Kademlia)
        except KeyError:
            raise NoOverlay(
                "this node runs no Kademlia overlay; build it with p2pdeploy.node.default_layers "
                "or add p2pdeploy.node.kademlia_layer to its layers"
            ) from None

    def _overlay_or_none(self) -> Kademlia | None:
        try:
            return self.overlay
        except NoOverlay:
            return None

    @property
    def snapshot_path(self) -> Path | None:
        """Where the routing table is saved (None without a data directory)."""
        return None if self.data_dir is None else self.data_dir / ROUTING_SNAPSHOT_FILE

    def core_counters(self) -> dict[str, int]:
        """Inputs the core dropped, by layer and kind (``PingProtocol.unsolicited_pong``, ...)."""
        counts = {f"Stack.{kind}": n for kind, n in self.core.dropped.items()}
        for layer in self.core.layers:
            counts.update({f"{type(layer).__name__}.{kind}": n for kind, n in layer.dropped.items()})
        return counts

    # -- lifetime ----------------------------------------------------------------------------
    async def run(
        self,
        listen: HostPort,
        layers: LayersFactory = default_layers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, build the core and serve until cancelled; ``started`` once traffic flows."""
        if self._transport is not None:
            raise RuntimeError("a RuntimeNode runs once; make a new one")
        transport = await Transport.bind(listen, self._deliver, self.counters, self.config.transport)
        executor = None
        state_server = None
        store = None
        try:
            contribution = self.requested_contribution
            executor_config = self._executor_config() if contribution is not None else None
            if executor_config is not None:
                self.machine = await trio.to_thread.run_sync(probe_machine, self._probe_dir(executor_config))
                contribution = contribution.clamp_to(self.machine)
            if self.data_dir is not None:
                close_data_dir(self.data_dir, executor_config)
            now = trio.current_time()
            store = self._store = open_store(self.data_dir, contribution)
            overlay_store = self._overlay_store = open_overlay_store(
                self.data_dir, self.config.kademlia, wall_clock_offset_s=time.time() - now, now=now)
            self._begin_uptime()
            context = CoreContext(
                self.identity,
                transport.address,
                self.rng,
                now,
                self.config.kademlia,
                contribution=contribution,
                machine=self.machine,
                remote=dataclasses.replace(self.config.remote, parse_bundles_ahead=True),
                remote_timeout_s=self.config.remote_timeout_s,
                wall_clock_offset_s=time.time() - now,
                prospector=self.config.prospector,
                store=store,
                overlay_store=overlay_store,
                persistence=self.config.persistence,
                detector=self.config.detector,
            )
            self._core = build_core(context, layers)
            if self._layer_or_none(Persistence) is not None:
                state_server = StateServer(self)
            if self._layer_or_none(ReplicaHost) is not None:
                executor = RealExecutor(executor_config or self._executor_config(), self._executor_report,
                                        environment=self._service_environment)
                self._wiring = ReplicaWiring(self._core, executor)
            self._advertise_availability(time.time(), now)
            overlay = self._overlay_or_none()
            if overlay is not None:
                self.restored_contacts = self._restore_snapshot(overlay)
                overlay.start(now)
        except BaseException:
            transport.close()
            self._end_uptime()
            self._close_persistence()
            self._core = None
            self._wiring = None
            self._remove_temporary_dir()
            raise
        self._transport = transport
        self._address = transport.address
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(transport.run)
                if state_server is not None:
                    # Before the executor: a service's environment names the server's port.
                    await nursery.start(state_server.run)
                    self.state_server = state_server
                if executor is not None:
                    # Started before the core can emit its first command; when the node stops it
                    # kills (SIGKILL) whatever the graceful stop in open_node/join left running.
                    await nursery.start(executor.run)
                    self.executor = executor
                await nursery.start(self._run_timer)
                if overlay is not None and self.data_dir is not None:
                    nursery.start_soon(self._save_snapshots_periodically)
                nursery.start_soon(self._refresh_clock_and_machine)
                nursery.start_soon(self._heartbeat_periodically)
                self._after_input()  # layers may have queued work while being built
                task_status.started()
        finally:
            self._nursery = None
            if overlay is not None:
                self._save_snapshot_logged()
            self._end_uptime()
            self._close_persistence()
            self._transport = None
            self._core = None
            self.state_server = None
            self._wiring = None
            self.executor = None
            self._remove_temporary_dir()
            for waiter in self._waiters:  # nobody can answer them now
                waiter.done.set()

    # -- persistence -------------------------------------------------------------------------
    @property
    def persistence(self) -> PersistenceClient:
        """Blobs, records and quorum records on the community, awaitable (``await
        node.persistence.put_blob(data)``); :class:`NoPersistence` on a node without the layer."""
        return PersistenceClient(self)

    def _service_environment(self, spec: ProcessSpec) -> dict[str, str]:
        """What a service's process gets besides its own variables: where the state API is and
        its token, for the namespace :func:`~p2pdeploy.runtime.state_api.replica_namespace`
        chooses: a managed replica's service ``NAME@OWNER`` (shared by every host of the
        service), else ``NAME@KEY`` with the public key that started it (hex), which the
        replicas of one starter's service on this node share."""
        server = self.state_server
        if server is None:
            return {}
        host = self._layer_or_none(ReplicaHost)
        starter = host.requested_by.get(spec.replica_id, b"") if host is not None else b""
        remote = self._layer_or_none(RemoteControl)
        managed = remote.managed.get(spec.replica_id) if remote is not None else None
        namespace, service = replica_namespace(spec.env.get(SERVICE_VARIABLE, ""), spec.replica_id, starter, managed)
        try:
            return server.environment(namespace, service=service)
        except StateError:  # a service name the state API cannot use as a namespace
            log.warning("replica %s gets no state API: %r is not a valid namespace", spec.replica_id, namespace)
            return {}

    def held_keys(self) -> int:
        """How many chunks and records this node holds for the community (0 without persistence)."""
        layer = self._layer_or_none(Persistence)
        if layer is None:
            return 0
        return len(layer.store.chunk_infos()) + len(layer.store.record_keys())

    async def leave_persistence(self) -> HandedOff | None:
        """Hand the keys this node holds to the nodes now responsible for them, within
        ``persistence_leave_s``, once; None when the node has no persistence layer, has left
        already or time ran out."""
        if self._layer_or_none(Persistence) is None or self._overlay_or_none() is None or self._left:
            return None
        self._left = True  # once: a second call (open_node's, after join's) has nothing to add
        with trio.move_on_after(self.config.persistence_leave_s):
            return await self.persistence.leave()
        log.warning("handing off stored keys took over %s s; repair on the others covers the rest",
                    self.config.persistence_leave_s)
        return None

    def _close_persistence(self) -> None:
        """Close the durable stores this node opened, and those its layers were built with (a layers
        factory may hand them others): the persistence layer's and the overlay's."""
        opened = [self._store, self._overlay_store]
        self._store = self._overlay_store = None
        layer = self._layer_or_none(Persistence)
        overlay = self._overlay_or_none()
        stores = [*opened, layer.store if layer is not None else None, overlay.store if overlay is not None else None]
        for store in {id(s): s for s in stores if s is not None}.values():
            try:
                store.close()
            except Exception:  # closing must not hide why the node stopped
                log.exception("closing the %s failed", type(store).__name__)

    # -- hosting replicas --------------------------------------------------------------------
    def _executor_config(self) -> RealExecutorConfig:
        if self.config.executor is not None:
            return self.config.executor
        if self.data_dir is not None:
            return RealExecutorConfig(self.data_dir)
        if self._temporary_dir is None:
            # Services may run as other users (on a root node): they must be able to pass through.
            self._temporary_dir = Path(tempfile.mkdtemp(prefix="p2pdeploy-node-"))
            self._temporary_dir.chmod(0o711)
        return RealExecutorConfig(self._temporary_dir)

    @staticmethod
    def _probe_dir(config: RealExecutorConfig) -> Path:
        """Where replicas' files go: the disk whose free space the node offers."""
        return Path(config.replicas_dir) if config.replicas_dir is not None else Path(config.data_dir)

    def _remove_temporary_dir(self) -> None:
        if self._temporary_dir is not None:
            shutil.rmtree(self._temporary_dir, ignore_errors=True)
            self._temporary_dir = None

    def _layer_or_none(self, cls: type[T]) -> T | None:
        core = self._core
        if core is None:
            return None
        try:
            layer: T = core.layer(cls)
        except KeyError:
            return None
        return layer

    @property
    def replica_host(self) -> ReplicaHost:
        """The replicas this node hosts (read their state; act through the facade)."""
        return self._required_layer(ReplicaHost, NotHosting(
            "this node hosts no replicas; give open_node a contribution "
            "(or run `p2pdeploy join`, which contributes within the owner's limits)"
        ))

    def _required_layer(self, cls: type[T], missing: Exception) -> T:
        """The node's layer of class ``cls``; ``missing`` raised when it runs none (or
        ``NodeNotRunning`` when that is the reason)."""
        layer = self._layer_or_none(cls)
        if layer is None:
            self.core  # noqa: B018 - raises NodeNotRunning when that is the reason
            raise missing
        return layer

    @property
    def contribution(self) -> Contribution | None:
        """What this node offers (clamped to its machine), or None when it hosts nothing."""
        host = self._layer_or_none(ReplicaHost)
        return None if host is None else host.contribution

    @property
    def replicas_dir(self) -> Path | None:
        """Where the replicas' files and logs are (None when the node hosts nothing)."""
        return None if self.executor is None else self.executor.root

    def hosted_replicas(self) -> list[ReplicaStatus]:
        """Every replica this node holds, in any state (empty when it hosts nothing)."""
        host = self._layer_or_none(ReplicaHost)
        return [] if host is None else host.statuses()

    def active_replicas(self) -> list[str]:
        """The replicas that run or will run again (not stopped, and not failed for good)."""
        host = self._layer_or_none(ReplicaHost)
        return [] if host is None else self._unfinished(host, [status.replica_id for status in host.statuses()])

    def _unfinished(self, host: ReplicaHost, replica_ids: Iterable[str]) -> list[str]:
        unfinished = []
        for replica_id in replica_ids:
            supervisor = host.supervisor(replica_id)
            if supervisor is not None and not supervisor.finished:
                unfinished.append(replica_id)
        return unfinished

    async def stop_hosted_replicas(self, reason: str = "the node is stopping") -> list[ReplicaStatus]:
        """Stop every replica this node runs and wait until each has stopped; their final statuses.

        Each gets its own stop sequence (TERM, KILL after the manifest's grace period); the wait
        is bounded by the longest sequence plus ``replica_stop_slack_s``. What is still running
        then is killed by the executor when the node stops.
        """
        host = self._layer_or_none(ReplicaHost)
        if host is None:
            return []
        active = self._unfinished(host, [status.replica_id for status in host.statuses()])
        if not active:
            return []
        longest_s = 0.0
        for replica_id in active:
            supervisor = host.supervisor(replica_id)
            assert supervisor is not None
            longest_s = max(longest_s, supervisor.spec.stop_grace_s + supervisor.spec.kill_wait_s)
        budget_s = longest_s + self.config.replica_stop_slack_s
        waiter = _Waiter(lambda _event: not self._unfinished(host, active))
        self._waiters.add(waiter)
        try:
            with trio.move_on_after(budget_s):
                for replica_id in active:
                    self.command(lambda now, replica_id=replica_id: host.stop_replica(replica_id, now, reason))
                if self._unfinished(host, active):
                    await waiter.done.wait()
        finally:
            self._waiters.discard(waiter)
        return [status for status in (host.status(r) for r in active) if status is not None]

    def _executor_report(self, report: ExecutorReport) -> None:
        """The executor's sink: a report is core input like a datagram."""
        wiring = self._wiring
        if wiring is None or self._core is None:
            return
        wiring.report(report, trio.current_time())
        self._after_input()

    async def _refresh_clock_and_machine(self) -> None:
        """Signed timestamps are wall time and the core runs on trio's clock: keep the offset fresh,
        and let requirements see the machine as it is now (free memory and disk, load)."""
        while True:
            await trio.sleep(self.config.machine_probe_interval_s)
            remote = self._layer_or_none(RemoteControl)
            if remote is not None and self.executor is not None:
                machine = await self._probe_again(self.executor.root)
                remote = self._layer_or_none(RemoteControl)  # the node may have stopped meanwhile
                if remote is None:
                    return
                if machine is not None:
                    self.machine = machine
                    remote.update_machine(machine)
                    description = self._layer_or_none(NodeDescription)
                    if description is not None:  # the prospector publishes the machine as it is now
                        description.set_machine(machine, self._now())
                        self._after_input()
            offset_s = time.time() - trio.current_time()
            for cls in (RemoteControl, RemoteClient):
                layer = self._layer_or_none(cls)
                if layer is not None:
                    layer.set_wall_clock_offset(offset_s)

    async def _probe_again(self, directory: Path) -> Machine | None:
        """The machine as it is now, or None when probing failed (out of descriptors, say): the
        last probe stands, and the failure is counted and logged, never fatal."""
        try:
            return await trio.to_thread.run_sync(probe_machine, directory)
        except (OSError, psutil.Error) as exc:
            self.counters["probe_errors"] += 1
            self._refusals.warning("probe", "probing the machine failed; keeping the last probe: %s", exc)
            return None

    # -- the uptime history ------------------------------------------------------------------
    def _begin_uptime(self) -> None:
        """Load the history (with a data directory) and begin this run's session: a session the
        last run left open (it crashed) ends at its last heartbeat."""
        if self.data_dir is not None:
            try:
                self._uptime_store = UptimeStore(self.data_dir)
                self.uptime = self._uptime_store.load()
            except (OSError, sqlite3.Error) as exc:  # a statistic is no reason to refuse to start
                self._uptime_store = None
                self.counters["uptime_errors"] += 1
                log.warning("cannot open the uptime history; measuring availability in memory: %s", exc)
        self.uptime.begin(time.time())
        self._save_uptime()

    def _save_uptime(self) -> None:
        if self._uptime_store is None:
            return
        try:
            self._uptime_store.save(self.uptime)
        except (OSError, sqlite3.Error) as exc:
            self.counters["uptime_errors"] += 1
            self._refusals.warning("uptime", "cannot save the uptime history: %s", exc)

    def _advertise_availability(self, wall_s: float, now: float) -> None:
        """Tell the description layer what the history says now (it announces real changes only)."""
        description = self._layer_or_none(NodeDescription)
        if description is not None:
            description.set_availability(self.uptime.availability(wall_s), now)

    async def _heartbeat_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.uptime_heartbeat_interval_s)
            self.heartbeat()

    def heartbeat(self) -> None:
        """Record that the node is up now, save the history and advertise the availability
        (every ``uptime_heartbeat_interval_s``; callable directly)."""
        wall_s = time.time()
        self.uptime.record_heartbeat(wall_s)
        self._save_uptime()
        if self._core is not None and self._transport is not None:
            self._advertise_availability(wall_s, trio.current_time())
            self._after_input()

    def _end_uptime(self) -> None:
        """The node stops: its session ends now, and the store is closed."""
        store, self._uptime_store = self._uptime_store, None
        self.uptime.end(time.time())
        if store is None:
            return
        try:
            store.save(self.uptime)
        except (OSError, sqlite3.Error) as exc:
            self.counters["uptime_errors"] += 1
            log.warning("cannot save the uptime history: %s", exc)
        finally:
            store.close()

    # -- the routing snapshot ----------------------------------------------------------------
    def _restore_snapshot(self, overlay: Kademlia) -> int:
        path = self.snapshot_path
        if path is None:
            return 0
        try:
            data = read_bounded(path)
        except (OSError, ValueError) as exc:
            log.warning("ignored the routing snapshot: %s", exc)
            return 0
        if not data:
            return 0
        restored = overlay.restore(data)
        if restored == 0:
            log.warning("ignored the routing snapshot %s: corrupt, empty or saved by another node", path)
        else:
            log.info("restored %d contacts from %s", restored, path)
        return restored

    def save_snapshot(self) -> Path | None:
        """Save the routing table to the data directory now; its path, or None when there is
        nothing to save (no data directory, no overlay, or no contact yet: an empty table would
        only overwrite a better snapshot)."""
        path = self.snapshot_path
        overlay = self._overlay_or_none()
        if path is None or overlay is None or len(overlay.table) == 0:
            return None
        write_file_atomically(path, overlay.snapshot())
        return path

    def _save_snapshot_logged(self) -> None:
        try:
            self.save_snapshot()
        except OSError as exc:
            self.counters["snapshot_errors"] += 1
            log.warning("cannot save the routing snapshot: %s", exc)

    async def _save_snapshot_in_thread(self) -> None:
        """Encode on the event loop (the core is not thread-safe), write and fsync in a thread."""
        async with self._snapshot_lock:
            path = self.snapshot_path
            overlay = self._overlay_or_none()
            if path is None or overlay is None or len(overlay.table) == 0:
                return
            data = overlay.snapshot()
            try:
                await trio.to_thread.run_sync(write_file_atomically, path, data)
            except OSError as exc:
                self.counters["snapshot_errors"] += 1
                log.warning("cannot save the routing snapshot: %s", exc)
            else:
                self.counters["snapshots_saved"] += 1

    async def _save_snapshots_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.snapshot_interval_s)
            await self._save_snapshot_in_thread()

    async def _run_timer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The node's one timer: a cancel scope whose deadline tracks the core's next deadline."""
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._core_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            deadline = self.core.next_deadline()
            if deadline is not None and deadline <= trio.current_time():
                self.core.handle_timer(max(deadline, trio.current_time()))
                self._after_input()

    def _core_deadline(self) -> float:
        deadline = self.core.next_deadline()
        return math.inf if deadline is None else deadline

    # -- the driver step: after every input ------------------------------------------------
    def _deliver(self, src: HostPort, data: bytes, limit_bytes: int) -> None:
        msg = wire.decode(data, limit_bytes)
        if isinstance(msg, wire.DecodeError):
            self.counters[msg.kind] += 1
            self._refusals.debug(
                f"dropped {msg.kind}", "dropped %d bytes from %s: %s (%s)", len(data), format_host_port(src), msg.kind,
                msg.detail
            )
            return
        if self._parse_bundle_ahead(src, msg):
            return
        self.core.receive(src, msg, trio.current_time())
        self._after_input()

    def _parse_bundle_ahead(self, src: HostPort, msg: Any) -> bool:
        """Take a trusted start's inline bundle to a worker thread to be parsed (decompressing it
        takes seconds, which the event loop must spend answering peers) and deliver the start
        after; True when the start is taken (or dropped: too many wait, counted)."""
        remote = self._layer_or_none(RemoteControl)
        nursery = self._nursery
        if remote is None or nursery is None or not remote.worth_parsing_ahead(msg):
            return False
        if self._bundles_parsing >= MAX_BUNDLES_PARSING:
            self.counters["bundle_parses_busy"] += 1  # the deployer's retry finds a free place
            return True
        self._bundles_parsing += 1
        nursery.start_soon(self._deliver_parsed, src, msg, remote.config.max_bundle_bytes)
        return True

    async def _deliver_parsed(self, src: HostPort, msg: Any, max_bytes: int) -> None:
        try:
            result = await trio.to_thread.run_sync(_parse_bundle, msg.bundle, max_bytes, limiter=self._bundle_parser)
        finally:
            self._bundles_parsing -= 1
        remote = self._layer_or_none(RemoteControl)
        if remote is None:  # the node stopped meanwhile
            return
        remote.bundle_parsed(msg.bundle, result)
        self.core.receive(src, msg, trio.current_time())
        self._after_input()

    async def _check_fetched_bundle(self, event: BundleToCheck, max_bytes: int) -> None:
        """Parse a bundle fetched by blob id in a worker thread, then let its replicas go on."""
        result = await trio.to_thread.run_sync(_parse_bundle, event.data, max_bytes, limiter=self._bundle_parser)
        fetcher = self._layer_or_none(BundleFetcher)
        if fetcher is None:  # the node stopped meanwhile
            return
        fetcher.bundle_checked(event.blob_id, result, trio.current_time())
        self._after_input()

    def _after_input(self) -> None:
        core = self.core
        now = trio.current_time()
        while (event := core.next_event(now)) is not None:
            self._dispatch(event)
        for dst, msg in core.messages_to_send():
            self._send(dst, msg)
        scope = self._timer_scope
        if scope is not None:
            deadline = self._core_deadline()
            if deadline != scope.deadline:  # most inputs leave it where it was; moving it costs trio more
                scope.deadline = deadline

    def _dispatch(self, event: Any) -> None:
        wiring = self._wiring
        if wiring is not None:
            try:
                wiring.dispatch(event, trio.current_time())
            except RuntimeError as exc:  # the executor has stopped: the node is stopping
                self.counters["executor_stopped"] += 1
                log.debug("%s not executed: %s", type(event).__name__, exc)
        if isinstance(event, BundleToCheck) and self._nursery is not None:
            self._nursery.start_soon(self._check_fetched_bundle, event, self.config.remote.max_bundle_bytes)
        if isinstance(event, PeerSeen):
            log.info("peer %040x seen at %s", event.node_id, format_host_port(event.address))
        elif isinstance(event, PeerDeclaredDead):
            self.counters["peers_declared_dead"] += 1
            log.info("peer %040x declared dead (incarnation %d)", event.node_id, event.incarnation)
        elif isinstance(event, PeerRecovered):
            self.counters["peers_recovered"] += 1
            log.info("peer %040x is alive again (incarnation %d)", event.node_id, event.incarnation)
        elif isinstance(event, Decision):
            log.info("%s", decision_line(event))
        if self._waiters:
            for waiter in list(self._waiters):
                if not waiter.done.is_set() and waiter.finished(event):
                    waiter.event = event
                    waiter.done.set()
        if not self._subscribers:
            return
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def _send(self, dst: Any, msg: Any) -> None:
        if not (
            isinstance(dst, tuple) and len(dst) == 2 and isinstance(dst[0], str) and isinstance(dst[1], int)
        ):
            self.counters["bad_destination"] += 1
            log.error("core sent %s to %r, which is not a (host, port) address", type(msg).__name__, dst)
            return
        try:
            data = wire.encode(msg, self.config.transport.stream_limit_bytes)
        except wire.WireError as exc:
            self.counters["encode_error"] += 1
            log.error("cannot send %s to %s: %s", type(msg).__name__, format_host_port(dst), exc)
            return
        transport = self._transport
        if transport is None:  # replicas report their exits while the node stops
            self.counters["send_after_close"] += 1
            return
        transport.send(dst, data)

    def _running_transport(self) -> Transport:
        if self._transport is None:
            raise NodeNotRunning("the node is not running; use it inside `async with open_node(...)`")
        return self._transport

    # -- the facade --------------------------------------------------------------------------
    def command(self, start: Callable[[float], T]) -> T:
        """Run a core API call ``start(now)`` that only queues work, then flush its output."""
        result = start(self._now())
        self._after_input()
        return result

    async def request(self, start: Callable[[float], T], finished: Callable[[T, Any], bool]) -> Any:
        """Run ``start(now)`` on the core and wait for the first event ``finished(result, event)`` accepts.

        ``start`` returns what identifies the work (a nonce, a query); the waiter is in place
        before the core's output is drained, so an event emitted at once is not missed. Bound
        the wait with a cancel scope.
        """
        token = start(self._now())
        waiter = _Waiter(lambda event: finished(token, event))
        self._waiters.add(waiter)
        try:
            self._after_input()
            if waiter.done.is_set():
                # Answered at once (a get the local store holds): no need to give other tasks a
                # turn before returning, but a cancelled caller still sees its cancellation.
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await waiter.done.wait()
            if waiter.event is None:
                raise NodeNotRunning("the node stopped before the answer came")
            return waiter.event
        finally:
            self._waiters.discard(waiter)

    # -- service deployment ------------------------------------------------------------------
    @property
    def deployment(self) -> Deployment:
        """The node's deployment layer (read its state; change it only through the facade)."""
        return self._required_layer(Deployment, NoDeployment(
            "this node runs no deployment layer; build it with p2pdeploy.node.default_layers "
            "(a full node, as `p2pdeploy join` runs)"
        ))

    async def deploy(
        self, bundle: SignedBundle, *, replicas: int | None = None, availability: float | None = None
    ) -> DeployFinished:
        """Deploy (or update) ``bundle`` as the service ``NAME@KEY``: the manifest's name, owned
        by this node's key; the layer's :class:`DeployFinished` once the record is written (or
        why not: ``ok`` False and the reason, e.g. ``no node offers 64 cores; the largest offers 8``).

        ``replicas`` or ``availability`` override the manifest's placement. The bundle must be
        signed by this node's key (hosts run ``NAME@OWNER`` only from bundles ``OWNER`` signed);
        its signature is checked and its manifest read in a worker thread first: a bundle signed
        by another key, or that does not verify or parse, is a :class:`ValueError` saying so.
        """
        if bundle.public_key != self.identity.public_key:
            # NAME@OWNER runs only bundles OWNER signed: hosts would refuse every start.
            raise ValueError(
                f"the bundle is signed by key {bundle.public_key.hex()[:16]}…, not this node's key "
                f"{self.identity.public_key.hex()[:16]}…, which owns the services it deploys; sign it with "
                "this node's key (`p2pdeploy bundle DIR --data-dir` of this node, or deploy the directory)"
            )
        manifest_text = await trio.to_thread.run_sync(
            _verified_manifest, bundle, self.config.remote.max_bundle_bytes, limiter=self._bundle_parser
        )
        layer = self.deployment
        return await self.request(
            lambda now: layer.deploy(bundle, manifest_text, now, replicas=replicas, availability=availability),
            lambda op, ev: isinstance(ev, DeployFinished) and ev.op_id == op,
        )

    async def scale(self, name: str, *, replicas: int | None = None, availability: float | None = None) -> DeployFinished:
        """Change the replica count (or the availability target) of this key's service ``name``."""
        layer = self.deployment
        return await self.request(
            lambda now: layer.scale(name, now, replicas=replicas, availability=availability),
            lambda op, ev: isinstance(ev, DeployFinished) and ev.op_id == op,
        )

    async def undeploy(self, name: str) -> DeployFinished:
        """Stop every replica of this key's service ``name`` (the name stays this key's)."""
        layer = self.deployment
        return await self.request(
            lambda now: layer.undeploy(name, now),
            lambda op, ev: isinstance(ev, DeployFinished) and ev.op_id == op,
        )

    async def service_status(self, service: ServiceId | str) -> StatusFinished:
        """What the manager of ``service`` (``NAME@OWNER``, or ``NAME`` of this node's key) wants
        and sees: the :class:`StatusFinished` whose ``report`` is None when no member of the
        service's group answered (its ``reason`` says why)."""
        service_id = self.service_id(service)
        layer = self.deployment
        return await self.request(
            lambda now: layer.status(service_id, now),
            lambda query, ev: isinstance(ev, StatusFinished) and ev.query_id == query,
        )

    async def services(self, owner: bytes | None = None) -> list[str]:
        """The names of ``owner``'s services (by default this node's key's), from its list record."""
        key = self.identity.public_key if owner is None else bytes(owner)
        layer = self.deployment
        event: ServicesListed = await self.request(
            lambda now: layer.list_services(key, now),
            lambda query, ev: isinstance(ev, ServicesListed) and ev.query_id == query,
        )
        return list(event.names)

    @asynccontextmanager
    async def service_events(
        self, service: ServiceId | str, filter_expr: str | None = None
    ) -> AsyncIterator[AsyncIterator[Delivered]]:
        """The decisions about ``service`` as its manager publishes them on the service's topic
        (``kind="service_decided"``, ``service``, ``decision``, ``reason``, ``replica``, ``node``),
        from now on; unsubscribes on exit."""
        async with self.events(self.service_id(service).topic, filter_expr) as (_, delivered):
            yield delivered

    def service_id(self, service: ServiceId | str) -> ServiceId:
        """``service`` as a :class:`ServiceId`: ``NAME@OWNER``, or ``NAME`` owned by this node's key
        (a ``ServiceIdError``, a :class:`ValueError`, when it does not parse)."""
        if isinstance(service, ServiceId):
            return service
        return ServiceId.parse(service, default_owner=self.identity.public_key)

    # -- the resource prospector -------------------------------------------------------------
    async def prospect(self, requirement: str, n: int) -> list[FoundNode]:
        """Up to ``n`` nodes satisfying ``requirement`` (the manifest language, e.g.
        ``cpu_free >= 1 and memory_free >= 512M``), spread over owners and regions."""
        layer = self.core.layer(Prospector)
        event = await self.request(
            lambda now: layer.prospect(requirement, n, now),
            lambda query, ev: isinstance(ev, ProspectFinished) and ev.query_id == query,
        )
        return event.nodes

    async def aggregate(self, attribute: str | None = None, fn: str = "count") -> Any:
        """``fn`` (count, sum, min, max, avg, ...) of ``attribute`` over the community, answered
        by the resource tree's root; ``attribute=None`` with ``count`` counts the nodes."""
        layer = self.core.layer(Prospector)
        event = await self.request(
            lambda now: layer.aggregate(attribute, fn, now),
            lambda query, ev: isinstance(ev, AggregateFinished) and ev.query_id == query,
        )
        if not event.ok:
            raise TimeoutError("the root of the resource tree did not answer")
        return event.value

    # -- group communication -----------------------------------------------------------------
    @property
    def pubsub(self) -> PubSub:
        return self.core.layer(PubSub)

    def publish(self, topic: str, attributes: Mapping[str, Any], *, reliable: bool = False) -> int:
        """Publish an event (attribute map) on ``topic``; returns its per-publisher sequence number."""
        layer = self.pubsub
        return self.command(lambda now: layer.publish(topic, attributes, now, reliable=reliable))

    @asynccontextmanager
    async def events(
        self, topic: str, filter_expr: str | None = None, buffer: int | None = None
    ) -> AsyncIterator[tuple[int, AsyncIterator[Delivered]]]:
        """Subscribe to ``topic`` (optionally with a content filter such as
        ``service == "wiki" and state in {"failed", "stopped"}``): yields the subscription id and
        an async iterator of the matching :class:`Delivered` events; unsubscribes on exit."""
        layer = self.pubsub
        with self.subscribe(buffer) as channel:
            subscription = self.command(lambda now: layer.subscribe(topic, filter_expr, now))

            async def matching() -> AsyncIterator[Delivered]:
                async for event in channel:
                    if isinstance(event, Delivered) and event.subscription_id == subscription:
                        yield event

            try:
                yield subscription, matching()
            finally:
                if self._core is not None:  # the node may have stopped first
                    self.command(lambda now: layer.unsubscribe(subscription, now))

    async def broadcast(self, payload: bytes, *, topic: str = "") -> BroadcastCompleted:
        """Reliable broadcast of ``payload`` to every node; returns when the tree reports back."""
        layer = self.core.layer(Broadcast)
        return await self.request(
            lambda now: layer.broadcast(payload, now, topic=topic, reliable=True),
            lambda broadcast_id, ev: isinstance(ev, BroadcastCompleted) and ev.broadcast_id == broadcast_id,
        )

    def _now(self) -> float:
        """The core's clock, for a call made through the facade (raises when not running)."""
        self._running_transport()
        return trio.current_time()

    async def ping_pong(
        self, address: HostPort, payload: bytes = b"", timeout_s: float | None = None
    ) -> PongReceived:
        """Ping ``address`` and return the core's :class:`PongReceived` (RTT, peer id, smoothed RTT).

        Raises :class:`PingTimeout` when no pong came within ``timeout_s`` or, without it, within
        the peer's retransmission timeout as the ping protocol estimates it (at least 1 s), and :class:`ValueError` when the payload cannot fit in one stream frame.
        """
        address = await self.resolve(address)
        self._check_fits(Ping(0, self.node_id, payload))
        layer = self.core.layer(PingProtocol)
        started = trio.current_time()
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s + 1.0):  # the core's timer ends it
            event = await self.request(
                lambda now: layer.ping(address, now, payload, timeout_s),
                lambda nonce, ev: isinstance(ev, PongReceived | PingTimedOut) and ev.nonce == nonce,
            )
            if isinstance(event, PongReceived):
                return event
        raise PingTimeout(address, trio.current_time() - started)

    async def ping(self, address: HostPort, payload: bytes = b"", timeout_s: float | None = None) -> float:
        """Ping ``address``; the round-trip time in seconds. See :meth:`ping_pong`."""
        return (await self.ping_pong(address, payload, timeout_s)).rtt_s

    async def join(self, addresses: Iterable[HostPort]) -> dict[HostPort, float | None]:
        """Join through the bootstrap addresses; their RTTs, None for an address that stayed silent.

        Two things happen at once: each address is pinged (``join_attempts`` tries each) for
        its RTT, and the overlay bootstraps (Kademlia's join: probe the addresses and the
        contacts restored from the routing snapshot, look ourselves up, refresh the buckets).
        The overlay's ``Joined`` event is kept in :attr:`overlay_joined`.
        """
        addresses = list(addresses)

        async def join_one(address: HostPort) -> None:
            rtt_s = None
            for _ in range(self.config.join_attempts):
                try:
                    rtt_s = await self.ping(address)
                    break
                except PingTimeout:
                    continue
                except ValueError as exc:
                    log.warning("cannot join via %s: %s", format_host_port(address), exc)
                    break
            if rtt_s is None:
                log.warning("bootstrap %s did not answer", format_host_port(address))
            self.bootstrap_rtts[address] = rtt_s

        try:
            async with trio.open_nursery() as nursery:
                for address in addresses:
                    nursery.start_soon(join_one, address)
                nursery.start_soon(self._join_overlay, addresses)
        finally:
            self._joined.set()
        return dict(self.bootstrap_rtts)

    async def _join_overlay(self, addresses: list[HostPort]) -> None:
        if self._overlay_or_none() is None:
            return
        resolved = []
        for address in addresses:  # the core matches answers by address: give it numeric ones
            try:
                resolved.append(await self.resolve(address))
            except ValueError as exc:
                log.warning("cannot join the overlay via %s: %s", format_host_port(address), exc)
        self.overlay_joined = await self.query(lambda overlay, now: overlay.bootstrap(resolved, now))
        log.info("overlay joined: %d contacts", self.overlay_joined.contacts)
        await self._save_snapshot_in_thread()

    async def wait_joined(self) -> dict[HostPort, float | None]:
        """Wait until the join that :func:`open_node` started is over: each bootstrap answered
        (or was given up on) and the overlay's join finished (:attr:`overlay_joined`)."""
        await self._joined.wait()
        return dict(self.bootstrap_rtts)

    # -- the overlay facade ------------------------------------------------------------------
    async def query(self, start: Callable[[Kademlia, float], int]) -> Any:
        """Run an overlay call ``start(overlay, now)`` that returns a query id; its finishing event.

        The event is the overlay's ``LookupFinished``, ``GetFinished``, ``PutFinished`` or
        ``Joined`` for that query. Every overlay query ends on its own (the core times out
        silent peers), so this always returns while the node runs; raises
        :class:`NodeNotRunning` if the node stops first and :class:`NoOverlay` without an overlay.
        """
        overlay = self.overlay
        return await self.request(
            lambda now: start(overlay, now),
            lambda query_id, ev: isinstance(ev, OVERLAY_RESULTS) and ev.query_id == query_id,
        )

    async def lookup(self, key: int) -> list[Contact]:
        """The k nodes closest to ``key`` that answered, closest (by XOR) first."""
        check_key(key)
        event: LookupFinished = await self.query(lambda overlay, now: overlay.lookup(key, now))
        return event.closest

    async def put(self, key: int, value: bytes, ttl_s: float | None = None) -> int:
        """Store ``value`` under ``key`` on the k closest nodes; how many stored it (this node included).

        The node republishes it every ``republish_interval_s`` while it runs. ``ttl_s`` defaults
        to the overlay's ``default_ttl_s``; a value over ``max_value_bytes`` or a TTL out of
        range is a :class:`ValueError`.
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"a value is bytes (got {type(value).__name__}); encode text first")
        return await self.put_item(key, Item(bytes(value)), ttl_s)

    async def put_item(self, key: int, item: Item, ttl_s: float | None = None) -> int:
        """Like :meth:`put` for an :class:`~p2pdeploy.overlay.storage.Item`: a plain value or a
        signed record from :func:`~p2pdeploy.overlay.storage.sign_record` (stored under its
        ``record_key``); a forged or misplaced record is a :class:`ValueError`."""
        check_key(key)
        if not isinstance(item, Item):
            raise TypeError(f"put_item takes an Item (got {type(item).__name__}); use put() for bytes")
        event: PutFinished = await self.query(lambda overlay, now: overlay.put_item(key, item, now, ttl_s))
        return event.stored

    async def get_item(self, key: int, *, latest: bool = False) -> Item | None:
        """The item stored under ``key``, or None when no node holds it.

        With ``latest`` every one of the k closest is asked and the highest-sequence record
        wins (replicas that answered an older one are repaired); without it the first valid
        value found is returned.
        """
        check_key(key)
        if not latest:  # a value this node holds is the answer, as the overlay's get would give it
            held = self.overlay.held(key, self._now())
            if held is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                return held
        event: GetFinished = await self.query(lambda overlay, now: overlay.get(key, now, latest=latest))
        return event.item

    async def get(self, key: int) -> bytes | None:
        """The value stored under ``key``, or None when no node holds it."""
        item = await self.get_item(key)
        return None if item is None else item.value

    # -- the remote protocol, deployer side -------------------------------------------------
    async def node_id_at(self, address: HostPort, timeout_s: float | None = None) -> int:
        """The id of the node at ``address``, from its pong (``join_attempts`` pings at most).

        Raises :class:`PingTimeout` when none comes back. The id is what signed requests name,
        so a node that lied about it would refuse them (``node`` check).
        """
        last: PingTimeout | None = None
        for _ in range(self.config.join_attempts):
            try:
                return (await self.ping_pong(address, timeout_s=timeout_s)).node_id
            except PingTimeout as exc:
                last = exc
        assert last is not None
        raise last

    async def remote_request(
        self,
        address: HostPort,
        call: Callable[[RemoteClient, HostPort, int, float], int],
        *,
        node_id: int | None = None,
    ) -> Reply:
        """Send one signed request ``call(client, address, node_id, now)`` and return the node's reply.

        The reply is a ``StatusReply``, a ``LogsReply`` or a ``Refused`` naming the check that
        failed; :class:`RemoteTimeout` when none comes within ``remote_timeout_s``. Without
        ``node_id`` the node is pinged for it first.
        """
        try:
            client: RemoteClient = self.core.layer(RemoteClient)
        except KeyError:
            raise NoRemoteClient(
                "this node runs no RemoteClient layer; build it with p2pdeploy.node.default_layers "
                "or p2pdeploy.node.client_layers"
            ) from None
        address = await self.resolve(address)  # replies are matched by the numeric address
        if node_id is None:
            node_id = await self.node_id_at(address)
        target = node_id
        event = await self.request(
            lambda now: call(client, address, target, now),
            lambda request_id, ev: isinstance(ev, RequestAnswered | RequestTimedOut) and ev.request_id == request_id,
        )
        if isinstance(event, RequestTimedOut):
            raise RemoteTimeout(address, event.request, client.timeout_s)
        reply: Reply = event.reply
        return reply

    async def remote_start(
        self,
        address: HostPort,
        replica_id: str,
        bundle: SignedBundle,
        *,
        bindings: dict[str, str] | None = None,
        node_id: int | None = None,
        by_blob: bool = False,
    ) -> Reply:
        """Ask the node at ``address`` to run ``bundle`` as ``replica_id``; its ``StatusReply`` or ``Refused``.

        With ``by_blob`` the bundle is first stored as a blob through this node's persistence
        (this node keeps a pinned copy; :class:`NoPersistence` on a node without the layer,
        :class:`BundleNotStored` when no node took a copy) and the start names the blob's id:
        the target fetches the bundle from the nodes that hold it (verified chunk by chunk, then
        its signature, as an inline one) and caches it, so a second replica of the bundle there
        fetches nothing. The reply then says ``fetching``; ask for the replica's status to
        see it run (or fail with the reason: ``bundle fetch failed: ...``, ``bundle: ...``).
        """
        blob_id: int | None = None
        if by_blob:
            stored = await self.persistence.put_blob(bundle.data, keep=True)
            if stored.replicas < 1:
                raise BundleNotStored(f"the bundle could not be stored as a blob: {stored.reason}")
            blob_id = stored.blob_id
        return await self.remote_request(
            address, lambda c, a, n, now: c.start(a, n, replica_id, bundle, now, bindings, blob_id=blob_id),
            node_id=node_id,
        )

    async def remote_stop(self, address: HostPort, replica_id: str, *, node_id: int | None = None) -> Reply:
        """Ask the node at ``address`` to stop ``replica_id`` (TERM, then KILL after its grace)."""
        return await self.remote_request(address, lambda c, a, n, now: c.stop(a, n, replica_id, now), node_id=node_id)

    async def remote_query(self, address: HostPort, replica_id: str, *, node_id: int | None = None) -> Reply:
        """The state of ``replica_id`` on the node at ``address``."""
        return await self.remote_request(address, lambda c, a, n, now: c.query(a, n, replica_id, now), node_id=node_id)

    async def remote_logs(
        self, address: HostPort, replica_id: str, max_bytes: int = MAX_LOG_BYTES, *, node_id: int | None = None
    ) -> Reply:
        """The last ``max_bytes`` of ``replica_id``'s logs on the node at ``address`` (``LogsReply``)."""
        return await self.remote_request(
            address, lambda c, a, n, now: c.fetch_logs(a, n, replica_id, now, max_bytes), node_id=node_id
        )

    @contextmanager
    def subscribe(self, buffer: int | None = None) -> Iterator[trio.MemoryReceiveChannel[Any]]:
        """A channel of every core event from now on (``PeerSeen``, ``PongReceived``, ...)."""
        send, receive = trio.open_memory_channel[Any](self.config.event_buffer if buffer is None else buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()

    async def resolve(self, address: HostPort) -> HostPort:
        """The numeric ``(host, port)`` the core knows a peer by (``localhost`` -> ``127.0.0.1``)."""
        host, port = address
        family = self._running_transport().family
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=family, type=stdlib_socket.SOCK_DGRAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {format_host_port(address)}: {exc}") from None
        if not infos:
            raise ValueError(f"cannot resolve {format_host_port(address)}")
        return (infos[0][4][0], port)

    def path_of(self, msg: Any) -> str:
        """``"udp"`` or ``"tcp"``: how this node would send ``msg``."""
        return path_for(len(wire.encode(msg, self.config.transport.stream_limit_bytes)))

    def _check_fits(self, msg: Any) -> None:
        try:
            wire.encode(msg, self.config.transport.stream_limit_bytes)
        except wire.WireError as exc:
            raise ValueError(
                f"{exc}; raise RuntimeConfig.transport.stream_limit_bytes or send less"
            ) from None


def decision_line(decision: Decision) -> str:
    """One line of a manager's decision: ``service NAME@OWNER12: DECISION REPLICA on NODE12: REASON``."""
    try:
        service = ServiceId.parse(decision.service).short()
    except ValueError:
        service = decision.service
    return f"service {service}: {decision}"


def _verified_manifest(bundle: SignedBundle, max_bytes: int) -> bytes:
    """The text of ``bundle``'s manifest, once its signature verifies and it parses (decompressing
    takes a while: run it in a worker thread)."""
    if not bundle.verify():
        raise ValueError("the bundle's signature does not verify with its key; sign it again (`p2pdeploy bundle`)")
    parsed = Bundle.parse(bundle.data, max_bytes=max_bytes)
    return read_member(parsed.data, MANIFEST_NAME, MAX_MANIFEST_BYTES)


def _parse_bundle(data: bytes, max_bytes: int) -> Bundle | BundleError:
    try:
        return Bundle.parse(data, max_bytes=max_bytes)
    except BundleError as exc:
        return exc


def close_data_dir(data_dir: Path, executor: RealExecutorConfig | None) -> None:
    """Keep other users out of the node's data directory (its store, keys and control socket):
    mode 0700, or 0711 when replica directories live below it, which services (other users on a
    root node) must pass through to reach their own; they still cannot list it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o002:  # a shared directory such as /tmp: not the node's to close
        log.warning("the data directory %s is writable by every user; give the node a directory of its own", data_dir)
        return
    replicas = None if executor is None else Path(executor.replicas_dir or Path(executor.data_dir) / "replicas")
    replicas_below = replicas is not None and replicas.resolve().is_relative_to(data_dir.resolve())
    data_dir.chmod(0o711 if replicas_below else 0o700)


def load_identity(data_dir: str | os.PathLike[str] | None) -> tuple[Identity, bool]:
    """The identity kept in ``data_dir`` (created on first start), or a fresh in-memory one."""
    if data_dir is None:
        return Identity.generate(), True
    return load_or_create_identity(data_dir)


@asynccontextmanager
async def open_node(
    listen: HostPort = ("127.0.0.1", 0),
    *,
    data_dir: str | os.PathLike[str] | None = None,
    bootstrap: Sequence[HostPort] = (),
    identity: Identity | None = None,
    seed: int | None = None,
    layers: LayersFactory = default_layers,
    config: RuntimeConfig | None = None,
    kademlia: KademliaConfig | None = None,
    contribution: Contribution | None = None,
    hand_off: bool = True,
) -> AsyncIterator[RuntimeNode]:
    """Run a node for the duration of the block; it is stopped and its sockets closed on exit.

    ``listen`` port 0 lets the OS choose (``node.address`` tells which). The identity comes
    from ``identity``, else from ``data_dir`` (created there on first start, mode 0600), else
    it is fresh and in memory. With ``data_dir`` the routing table is saved there and restored
    on the next start. The node joins in the background through ``bootstrap`` and the restored
    contacts (:meth:`RuntimeNode.wait_joined`). ``layers`` builds the core's protocol layers;
    ``kademlia`` replaces ``config.kademlia``.

    With a ``contribution`` the node hosts replicas within it (clamped to the machine): signed
    requests from the keys it trusts start them. When the block ends its replicas are stopped
    (TERM, then KILL after their grace period) before the node stops; when it is cancelled from
    outside they are killed at once. Either way none outlives the block.

    With the persistence layer (the default layers have it) a block that ends normally then
    has the node hand the keys it holds to the nodes now responsible for them, within
    ``RuntimeConfig.persistence_leave_s`` (``hand_off=False`` skips it: a test that means the
    node to vanish). A block that raised or was cancelled leaves at once.
    """
    created = False
    if identity is None:
        identity, created = load_identity(data_dir)
    if kademlia is not None:
        config = dataclasses.replace(config or RuntimeConfig(), kademlia=kademlia)
    node = RuntimeNode(
        identity, seed=seed, config=config, identity_created=created, data_dir=data_dir, contribution=contribution
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run, listen, layers)
            nursery.start_soon(node.join, list(bootstrap))
            block_finished = False
            try:
                yield node
                block_finished = True
            finally:
                try:
                    await node.stop_hosted_replicas()
                    if hand_off and block_finished:  # not when the block raised or was cancelled
                        await node.leave_persistence()
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's block runs inside this nursery; give back its exception (or a failed
        # bind's) as raised, not wrapped in a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
