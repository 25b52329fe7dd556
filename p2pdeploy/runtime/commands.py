"""The bodies of the ``p2pdeploy`` node commands, narrated with rich.

``join`` runs a node in the foreground, with its control socket in the data directory, and
hosts replicas within the owner's contribution; ``ping`` runs an ephemeral node; ``put``,
``get``, ``lookup``, ``status`` and ``blob`` talk to the running ``join`` node of a data directory
through its control socket (:mod:`~p2pdeploy.runtime.control`), each by the declaration of its
request (:func:`run_control_command`). ``key`` and ``bundle`` use the data
directory's key; ``replica start|stop|status|logs`` send signed requests to a node, through the
running node of the data directory when there is one, else from an ephemeral node with its key.

``cli.py`` parses options and calls these inside ``trio.run``. Lines a script reads are plain
and stable: ``node id HEX``, ``public key HEX``, ``listening on HOST:PORT``,
``trusted key HEX``, ``control socket PATH``, ``joined via HOST:PORT ...``, ``overlay joined: N contacts``,
``peer HEX at HOST:PORT``, ``replica ID: STATE[: REASON]``, ``refused REQUEST from HOST:PORT:
REASON``, ``stopped``; for ``ping``, ``pong from HEX at HOST:PORT: seq=N ...``; for ``put``,
``stored NAME (key HEX) on N nodes``; ``get`` prints the value alone; ``lookup`` prints one
``HEX HOST:PORT`` line per contact, closest first; ``key`` prints the public key alone; the
``replica`` commands print ``replica ID on node HEX at HOST:PORT: STATE[: REASON]`` and, on
standard error, ``refused by node HEX at HOST:PORT: CHECK: REASON`` (the check that failed:
``trust``, ``bundle``, ``admission``, ``requirements``, ...).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import signal
import sys
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from rich.console import Console

from p2pdeploy.collective.deployment_messages import Decision
from p2pdeploy.fabric.contribution import (
    ANY,
    KNOWN_KEYS,
    Contribution,
    ContributionError,
)
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.supervisor import ReplicaState, ReplicaStateChanged
from p2pdeploy.fabric.units import format_size
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.ping import PeerSeen, Ping
from p2pdeploy.resource.bundle import Bundle, SignedBundle
from p2pdeploy.resource.protocol import (
    LogsReply,
    Refused,
    ReplicaStartAccepted,
    RequestRefused,
)
from p2pdeploy.resource.protocol import StatusReply as ReplicaStatusReply
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.bundlefile import bundle_from_directory, read_signed_bundle, write_signed_bundle
from p2pdeploy.runtime.configfile import read_config_section
from p2pdeploy.runtime.control import (
    ControlClient,
    ControlRequestRefused,
    ControlSocket,
    NoNodeRunning,
    ReplicaAnswer,
    ReplicaRequest,
    command_named,
    control_request,
    open_control,
    serve_replica_request,
)
from p2pdeploy.runtime.control_views import (  # noqa: F401  (importable from here, as before)
    Unsendable,
    blob_id_of,
    contribution_table,
    detector_table,
    key_of_name,
    status_to_json,
)
from p2pdeploy.runtime.control_views import count as _count
from p2pdeploy.runtime.executor import service_user_cannot_enter
from p2pdeploy.runtime.keyfile import key_path, load_or_create_identity
from p2pdeploy.runtime.listeners import RefusalLog
from p2pdeploy.runtime.node import (
    PingTimeout,
    RemoteTimeout,
    RuntimeConfig,
    RuntimeNode,
    decision_line,
    open_node,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long ``put``/``get``/``lookup``/``status`` wait for the node; an overlay query ends on its own well before.
CONTROL_TIMEOUT_S = 120.0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/p2pdeploy``, by default ``~/.local/share/p2pdeploy``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base).absolute() / "p2pdeploy"


def make_console() -> Console:
    # soft_wrap: a long line is never folded, so scripts can read it whatever the width.
    return Console(soft_wrap=True, highlight=False)


def kademlia_config(overrides: Sequence[tuple[str, str]]) -> KademliaConfig:
    """A :class:`KademliaConfig` with ``(field, text)`` overrides (``join --kademlia k=8``).

    Raises :class:`ValueError` naming the field and the valid ones.
    """
    hints = typing.get_type_hints(KademliaConfig)
    values: dict[str, object] = {}
    for name, text in overrides:
        kind = hints.get(name)
        if kind is None:
            raise ValueError(f"unknown Kademlia parameter {name!r}; one of: {', '.join(hints)}")
        try:
            if kind is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                values[name] = lowered in ("true", "1", "yes", "on")
            elif typing.get_origin(kind) is tuple:  # a list, comma-separated: prefix_exempt=10.0.0.0/8,::1/128
                values[name] = tuple(part.strip() for part in text.split(",") if part.strip())
            else:
                values[name] = kind(text)
        except ValueError:
            raise ValueError(f"Kademlia parameter {name} takes {kind.__name__} (got {text!r})") from None
    return KademliaConfig(**values)  # type: ignore[arg-type]


async def run_join(
    listen: HostPort,
    bootstrap: Sequence[HostPort],
    data_dir: str | os.PathLike[str],
    console: Console,
    config: RuntimeConfig | None = None,
    contribution: Contribution | None = None,
) -> None:
    """Run a node until SIGINT or SIGTERM, then stop its replicas and the node cleanly.

    With a ``contribution`` the node hosts replicas within it (``p2pdeploy join`` always gives
    one: the owner's, or the conservative defaults). A second signal while the replicas stop
    kills them at once.
    """
    # Signals are caught from before the node exists, so a SIGTERM right after the
    # "listening on" line still stops it gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        identity, created = load_or_create_identity(data_dir)
        key_file = key_path(data_dir)
        # The control socket first: a second node on the same data dir stops here, before binding ports.
        control = await ControlSocket.bind(data_dir)
        try:
            async with open_node(
                listen, identity=identity, data_dir=data_dir, bootstrap=bootstrap, config=config,
                contribution=contribution,
            ) as node:  # fmt: skip
                with node.subscribe() as events:
                    console.print(f"node id [bold]{node.node_id_hex}[/]")
                    console.print(f"[dim]identity {'created in' if created else 'loaded from'} {key_file}[/]")
                    console.print(f"public key {identity.public_key.hex()}")
                    if node.restored_contacts:
                        console.print(
                            f"[dim]routing table: {node.restored_contacts} contacts restored from {node.snapshot_path}[/]"
                        )
                    console.print(f"listening on [bold]{format_host_port(node.address)}[/] [dim](udp and tcp)[/]")
                    if not bootstrap and not node.restored_contacts:
                        console.print("[dim]no --bootstrap: this node starts a community; others join via it[/]")
                    if node.contribution is not None:
                        print_contribution(node, console)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(control.serve, node)
                        console.print(f"control socket {control.path}")
                        if node.state_server is not None:
                            console.print(f"[dim]state API for this node's services: {node.state_server.url}[/]")
                        nursery.start_soon(_report_events, events, node, console)
                        nursery.start_soon(_report_join, node, console)
                        async for signum in signals:
                            console.print(f"stopping on {signal.Signals(signum).name}")
                            break
                        await _stop_replicas(node, signals, console)
                        await _hand_off(node, signals, console)
                        nursery.cancel_scope.cancel()
        finally:
            control.close()
    console.print("stopped")


async def _until_second_signal(
    signals: AsyncIterator[int], console: Console, then: str, work: Callable[[], Awaitable[T]]
) -> T | None:
    """Run ``work`` (part of a graceful stop); a second signal cuts it short, saying ``then``.
    Its result, or None when cut short."""
    result = None
    async with trio.open_nursery() as nursery:

        async def cut_short_on_signal() -> None:
            async for signum in signals:
                console.print(f"{signal.Signals(signum).name} again: {then}")
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(cut_short_on_signal)
        result = await work()
        nursery.cancel_scope.cancel()
    return result


async def _stop_replicas(node: RuntimeNode, signals: AsyncIterator[int], console: Console) -> None:
    """Stop the node's replicas gracefully before the node goes; a second signal kills them now."""
    active = node.active_replicas()
    if not active:
        return
    console.print(f"stopping {_count(len(active), 'replica')} (TERM, then KILL after each one's grace period)")
    await _until_second_signal(signals, console, "killing the replicas now", node.stop_hosted_replicas)


async def _hand_off(node: RuntimeNode, signals: AsyncIterator[int], console: Console) -> None:
    """Hand what the node holds for the community to the nodes now closest; a second signal skips it."""
    held = node.held_keys()
    if not held:
        return
    console.print(f"handing {_count(held, 'stored key')} to the nodes now closest "
                  f"(at most {node.config.persistence_leave_s:g} s; a second signal skips it)")
    done = await _until_second_signal(signals, console, "leaving without handing off", node.leave_persistence)
    if done is not None:
        copies = "1 copy" if done.copies == 1 else f"{done.copies} copies"
        console.print(f"handed off {_count(done.keys, 'key')}: {copies} acknowledged by the nodes now closest")


def print_contribution(node: RuntimeNode, console: Console) -> None:
    """What the node offers, against what the machine has, and whom it trusts."""
    contribution = node.contribution
    assert contribution is not None
    console.print(contribution_table(contribution, node.machine, node.replicas_dir))
    if contribution.trusted_keys != ANY:
        for key in sorted(contribution.trusted_keys):
            console.print(f"trusted key {key.hex()}")
    if contribution.trusted_keys != ANY and not contribution.trusted_keys:
        console.print(
            "[yellow]this node trusts no deployer yet[/]: only its own key may start services here; "
            "add --trust KEY (a deployer's `p2pdeploy key`) or --trust any for an open community"
        )
    executor = node.executor
    if executor is not None:
        isolation = executor.isolation()
        console.print(isolation if executor.uid_per_replica else f"[yellow]{isolation}[/]")
        problem = service_user_cannot_enter(executor.root, executor.uid, executor.gid)
        if problem is not None:
            console.print(
                f"[yellow]services cannot run from {executor.root}[/]: {problem}; "
                "start the node with --replicas-dir on a path every user can enter, "
                "e.g. /var/lib/p2pdeploy/replicas"
            )




async def _report_events(events: trio.MemoryReceiveChannel[object], node: RuntimeNode, console: Console) -> None:
    refusals = RefusalLog(log)
    async for event in events:
        if isinstance(event, PeerSeen):
            console.print(f"peer [bold]{event.node_id:040x}[/] at {format_host_port(event.address)}")
        elif isinstance(event, ReplicaStateChanged):
            line = f"replica {event}"
            if event.new is ReplicaState.RUNNING:
                status = node.replica_host.status(event.replica_id)
                if status is not None and status.port is not None:
                    line += f" (port {status.port})"
            console.print(line, markup=False)
        elif isinstance(event, Decision):
            console.print(decision_line(event), markup=False)
        elif isinstance(event, ReplicaStartAccepted):
            console.print(
                f"[dim]accepted {event.service} {event.version} as {event.replica_id} "
                f"from key {event.signer.hex()[:16]}…[/]"
            )
        elif isinstance(event, RequestRefused):
            # One line per request kind and check per interval: a flood of refusals is summarized.
            suppressed = refusals.allow(f"{event.request} {event.check}")
            if suppressed is not None:
                where = format_host_port(event.src) if isinstance(event.src, tuple) else str(event.src)
                more = f" (and {suppressed} more like it suppressed)" if suppressed else ""
                console.print(f"refused {event.request} from {where}: {event.reason}{more}", markup=False)


async def _report_join(node: RuntimeNode, console: Console) -> None:
    for address, rtt_s in (await node.wait_joined()).items():
        where = format_host_port(address)
        if rtt_s is None:
            console.print(
                f"[yellow]bootstrap {where} did not answer[/]; waiting for others to join via this node"
            )
        else:
            console.print(f"joined via {where} (rtt {rtt_s * 1000:.3f} ms)")
    joined = node.overlay_joined
    if joined is not None and joined.ok:
        console.print(f"overlay joined: {_count(joined.contacts, 'contact')}")
    elif joined is not None:
        console.print("overlay joined: 0 contacts [dim](waiting for others to join via this node)[/]")


async def run_ping(
    target: HostPort,
    *,
    count: int,
    payload_bytes: int,
    listen: HostPort,
    interval_s: float,
    timeout_s: float | None,
    console: Console,
) -> int:
    """Ping ``target`` from an ephemeral node ``count`` times; exit status 0 when any pong came back."""
    payload = bytes(payload_bytes)
    rtts_s: list[float] = []
    async with open_node(listen) as node:
        address = await node.resolve(target)
        path = node.path_of(Ping(0, node.node_id, payload))
        console.print(
            f"PING {format_host_port(address)} from {format_host_port(node.address)}: "
            f"{payload_bytes} payload bytes by {path}"
        )
        for seq in range(1, count + 1):
            try:
                pong = await node.ping_pong(address, payload, timeout_s)
            except PingTimeout as exc:
                console.print(f"[red]seq={seq} timed out[/]: {exc}")
            else:
                rtts_s.append(pong.rtt_s)
                console.print(
                    f"pong from [bold]{pong.node_id:040x}[/] at {format_host_port(pong.address)}: "
                    f"seq={seq} bytes={pong.payload_bytes} rtt={pong.rtt_s * 1000:.3f} ms via {path}"
                )
            if seq < count and interval_s > 0:
                await trio.sleep(interval_s)
    lost = count - len(rtts_s)
    summary = f"{count} pings, {len(rtts_s)} pongs, {lost} lost"
    if rtts_s:
        low, mean, high = min(rtts_s), math.fsum(rtts_s) / len(rtts_s), max(rtts_s)
        summary += f"; rtt min/avg/max = {low * 1000:.3f}/{mean * 1000:.3f}/{high * 1000:.3f} ms"
    console.print(summary)
    return 0 if rtts_s else 1


# -- commands that talk to a running node ----------------------------------------------------


async def run_control_command(
    name: str, arguments: Mapping[str, Any], data_dir: str | os.PathLike[str], console: Console, *, as_json: bool = False
) -> int:
    """Send the request of the command ``name`` (declared in :data:`~p2pdeploy.runtime.control.CONTROL_COMMANDS`),
    made from its ``arguments``, to the node of ``data_dir``; print the reply (``as_json``: as one
    JSON object). Its exit status."""
    command = command_named(name)
    assert command.ask is not None and command.show is not None
    try:
        request = command.ask(arguments)
    except Unsendable as exc:
        console.print(exc.message)
        return exc.status
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply = await control_request(data_dir, request)
    if as_json and command.to_json is not None:
        console.print(json.dumps(command.to_json(reply)), markup=False, highlight=False, soft_wrap=True)
        return 0
    return command.show(reply, {**arguments, "data_dir": data_dir}, console)


async def run_put(
    name: str, value: bytes, ttl_s: float | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Store VALUE under NAME through the node of ``data_dir``; exit status 0 when any node stored it."""
    return await run_control_command("put", {"name": name, "value": value, "ttl_s": ttl_s}, data_dir, console)


async def run_get(name: str, data_dir: str | os.PathLike[str], console: Console) -> int:
    """Print the value under NAME (the bytes, then a newline); exit status 1 when none is found."""
    return await run_control_command("get", {"name": name}, data_dir, console)


async def run_lookup(name: str, data_dir: str | os.PathLike[str], console: Console) -> int:
    """Print the nodes closest to NAME's key, closest first, as ``HEX HOST:PORT`` lines."""
    return await run_control_command("lookup", {"name": name}, data_dir, console)


async def run_blob_put(
    path: str | os.PathLike[str], replicas: int | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Store a file as a content-addressed blob (chunks replicated on the nodes closest to each
    chunk's id) through the node of ``data_dir``; print its id. Exit status 1 when not stored."""
    return await run_control_command("blob put", {"path": path, "replicas": replicas}, data_dir, console)


async def run_blob_get(
    blob_id: str, out: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Fetch a blob (every chunk checked against its hash) to ``out``, or to standard output."""
    return await run_control_command("blob get", {"blob_id": blob_id, "out": out}, data_dir, console)


async def run_status(data_dir: str | os.PathLike[str], console: Console, *, as_json: bool = False) -> int:
    """Show the node's id, address, routing table, store, failure detector and counters as tables
    (``as_json``: one JSON object instead)."""
    return await run_control_command("status", {}, data_dir, console, as_json=as_json)


# -- the contribution of a join node -------------------------------------------------------

#: The ``join`` option that sets each key of the ``[contribution]`` table.
CONTRIBUTION_OPTIONS = {
    "cpu": "--cpu", "memory": "--memory", "disk": "--disk", "bandwidth": "--bandwidth",
    "max_services": "--max-services", "trusted_keys": "--trust", "allowed_tags": "--allow-tag",
    "tags": "--tag", "owner": "--owner", "retention": "--retention",
}  # fmt: skip
CONFIG_FILE = "config.toml"
_FLAGS_SOURCE = "command line"


class ContributionOptionError(ValueError):
    """A ``join`` option's value is not valid; ``option`` names it (``--memory``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def contribution_options(
    *,
    cpu: str | None = None,
    memory: str | None = None,
    disk: str | None = None,
    bandwidth: str | None = None,
    max_services: int | None = None,
    trust: Sequence[str] = (),
    allow_tags: Sequence[str] = (),
    tags: Sequence[str] = (),
    owner: str | None = None,
    retention: str | None = None,
) -> dict[str, Any]:
    """The ``[contribution]`` keys the ``join`` options set (only those given).

    ``--trust any`` (or ``--allow-tag any``) anywhere in the list means any key (any tag).
    """
    table: dict[str, Any] = {}
    for key, value in (("cpu", cpu), ("memory", memory), ("disk", disk), ("bandwidth", bandwidth)):
        if value is not None:
            table[key] = value
    if max_services is not None:
        table["max_services"] = max_services
    if trust:
        table["trusted_keys"] = ANY if ANY in trust else list(trust)
    if allow_tags:
        table["allowed_tags"] = ANY if ANY in allow_tags else list(allow_tags)
    if tags:
        table["tags"] = list(tags)
    if owner is not None:
        table["owner"] = owner
    if retention is not None:
        table["retention"] = retention
    return table


def join_contribution(
    options: Mapping[str, Any], config_path: Path | None, machine: Machine
) -> tuple[Contribution, Path | None]:
    """The contribution of a ``join`` node: its options over the config file's ``[contribution]``.

    Each option is checked on its own first, so a bad one is a :class:`ContributionOptionError`
    naming it; a bad key of the file is a ``ContributionError`` naming the file and the key.
    Percentages are of ``machine``, and the result is clamped to it. Returns the contribution
    and the config file read (None when there was none).
    """
    for key, value in options.items():
        try:
            Contribution.from_table({key: value}, machine, source=_FLAGS_SOURCE, section="")
        except ContributionError as exc:
            message = str(exc).removeprefix(f"{_FLAGS_SOURCE}: {key}").lstrip(": ")
            if key == "trusted_keys":
                bad = next((k for k in value if len(_hex_or_empty(k)) != 32), value)
                message = f"expected `any` or a 64-digit hex Ed25519 public key, what a deployer's `p2pdeploy key` prints (got {bad!r})"
            raise ContributionOptionError(CONTRIBUTION_OPTIONS[key], message) from None
    table: dict[str, Any] = {}
    if config_path is not None:
        table = read_config_section(config_path, "contribution")
    merged = {**table, **options}
    source = config_path.name if config_path is not None else _FLAGS_SOURCE
    return Contribution.from_table(merged, machine, source=source), config_path


assert set(CONTRIBUTION_OPTIONS) == set(KNOWN_KEYS)


def _hex_or_empty(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


# -- keys and bundles ----------------------------------------------------------------------


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def load_key(data_dir: str | os.PathLike[str]) -> Identity:
    """The key of ``data_dir`` (created, mode 0600, when it has none: said on standard error)."""
    identity, created = load_or_create_identity(data_dir)
    if created:
        _stderr().print(f"[dim]created a key in {key_path(data_dir)}[/]")
    return identity


def run_key(data_dir: str | os.PathLike[str], console: Console) -> int:
    """Print the data directory's public key alone: what volunteers pass to ``join --trust``."""
    console.print(load_key(data_dir).public_key.hex())
    return 0


def run_bundle(
    directory: str | os.PathLike[str], out: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Pack a service directory, sign it with the data directory's key, write FILE and FILE.sig."""
    bundle = bundle_from_directory(directory)
    manifest = bundle.manifest
    signed = bundle.sign(load_key(data_dir))
    path = Path(out) if out is not None else Path(f"{manifest.name}-{manifest.version}.tar.gz")
    sig_path = write_signed_bundle(path, signed)
    files = sum(1 for member in bundle.members if member.kind == "file")
    console.print(
        f"bundle {manifest.name} {manifest.version}: {_count(files, 'file')}, {format_size(len(bundle.data))}, "
        f"sha256 {bundle.digest.hex()}"
    )
    console.print(f"signed by key {signed.public_key.hex()}")
    console.print(f"wrote {path} and {sig_path}")
    return 0


def load_bundle(source: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> tuple[SignedBundle, Bundle]:
    """A service directory packed and signed now with the data directory's key, or a bundle file
    with its signature file (``p2pdeploy bundle``)."""
    path = Path(source)
    signed = bundle_signed_now(path, data_dir) if path.is_dir() else read_signed_bundle(path)
    return signed, Bundle.parse(signed.data)


def bundle_signed_now(directory: Path, data_dir: str | os.PathLike[str]) -> SignedBundle:
    return bundle_from_directory(directory).sign(load_key(data_dir))


# -- signed replica requests to a node -----------------------------------------------------

#: Seconds between status requests while a command waits for a replica to run or stop.
POLL_INTERVAL_S = 0.2
#: Exit status of a ``replica`` command whose request the node refused (or whose replica failed).
EXIT_REFUSED = 1


class ReplicaCommandError(Exception):
    """A ``replica`` command could not get an answer (no node there, timeout); says what to check."""


@dataclass
class ReplicaChannel:
    """Where a ``replica`` command's requests leave from: the running node of the data dir, or an
    ephemeral node with its key. Either way the request is signed with that key."""

    description: str
    control: ControlClient | None = None
    node: RuntimeNode | None = None

    async def send(self, request: ReplicaRequest) -> ReplicaAnswer:
        where = format_host_port(request.address)
        log.info("%s %s to %s, %s", request.operation, request.replica_id, where, self.description)
        try:
            with trio.fail_after(CONTROL_TIMEOUT_S):  # every step below ends on its own well before
                if self.control is not None:
                    answer: ReplicaAnswer = await self.control.request(request)
                    return answer
                assert self.node is not None
                return await serve_replica_request(self.node, request)
        except ControlRequestRefused as exc:
            raise ReplicaCommandError(f"{where}: {exc.reason}") from None
        except PingTimeout:
            raise ReplicaCommandError(
                f"no node answers at {where}: check the address (`p2pdeploy ping {where}`)"
            ) from None
        except RemoteTimeout as exc:
            raise ReplicaCommandError(str(exc)) from None


def default_client_listen(target: HostPort) -> HostPort:
    """Where an ephemeral node listens for the answers: loopback for a loopback target, else every interface."""
    try:
        loopback = ipaddress.ip_address(target[0]).is_loopback
    except ValueError:
        loopback = target[0] == "localhost"
    return ("127.0.0.1", 0) if loopback else ("0.0.0.0", 0)


@asynccontextmanager
async def open_replica_channel(
    data_dir: str | os.PathLike[str], target: HostPort, listen: HostPort | None = None
) -> AsyncIterator[ReplicaChannel]:
    """Through the control socket of the node running with ``data_dir``; else an ephemeral node."""
    async with AsyncExitStack() as stack:
        try:
            control = await stack.enter_async_context(open_control(data_dir))
        except NoNodeRunning:
            control = None
        if control is not None:
            yield ReplicaChannel(f"via the running node of {os.fspath(data_dir)}", control=control)
            return
        identity = load_key(data_dir)
        address = listen if listen is not None else default_client_listen(target)
        node = await stack.enter_async_context(open_node(address, identity=identity, layers=client_layers))
        yield ReplicaChannel(f"from an ephemeral node with the key of {os.fspath(data_dir)}", node=node)


def _node_words(answer: ReplicaAnswer) -> str:
    return f"node {answer.node:040x} at {format_host_port((answer.host, answer.port))}"


def _refused(answer: ReplicaAnswer, reply: Refused) -> int:
    reason = reply.reason if reply.reason.startswith(f"{reply.check}:") else f"{reply.check}: {reply.reason}"
    _stderr().print(f"refused by {_node_words(answer)}: {reason}", markup=False)
    return EXIT_REFUSED


def _status_line(reply: ReplicaStatusReply) -> str:
    line = f"replica {reply.replica_id}: {reply}"
    if reply.state == ReplicaState.RUNNING.value and reply.port is not None:
        line += f" (port {reply.port})"
    return line


async def _wait_for_state(
    channel: ReplicaChannel, answer: ReplicaAnswer, replica_id: str, done: Sequence[str], timeout_s: float
) -> ReplicaAnswer:
    """Ask for the replica's status until its state is one of ``done`` (or ``timeout_s`` passes)."""
    request = ReplicaRequest("status", answer.host, answer.port, replica_id, node=answer.node)
    with trio.move_on_after(timeout_s):
        while True:
            answer = await channel.send(request)
            reply = answer.reply
            if isinstance(reply, Refused) or (isinstance(reply, ReplicaStatusReply) and reply.state in done):
                return answer
            await trio.sleep(POLL_INTERVAL_S)
    return answer


async def run_replica_start(
    source: str | os.PathLike[str],
    target: HostPort,
    replica_id: str | None,
    bindings: Mapping[str, str],
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    wait: bool = True,
    timeout_s: float = 60.0,
    listen: HostPort | None = None,
    by_blob: bool = False,
) -> int:
    """Send a signed StartReplica with a bundle to the node at ``target``; by default wait until it runs.

    ``by_blob``: the running node of ``data_dir`` stores the bundle as a blob (keeping a copy)
    and the start names its id; the target fetches it from the nodes that hold it."""
    signed, bundle = load_bundle(source, data_dir)
    manifest = bundle.manifest
    replica_id = replica_id or f"{manifest.name}-1"
    console.print(
        f"[dim]bundle {manifest.name} {manifest.version} ({format_size(len(signed.data))}, "
        f"sha256 {signed.digest.hex()[:16]}…) signed by key {signed.public_key.hex()[:16]}…[/]"
    )
    request = ReplicaRequest.start(target, replica_id, signed, dict(bindings), by_blob=by_blob)
    async with open_replica_channel(data_dir, target, listen) as channel:
        if by_blob and channel.control is None:
            raise ReplicaCommandError(
                "--by-blob stores the bundle through the persistence of a running node: start one with "
                f"`p2pdeploy join --data-dir {os.fspath(data_dir)}` first, or send the bundle inline"
            )
        return await _send_and_wait(channel, request, ("running", "failed", "stopped"), wait, timeout_s, console)


async def _send_and_wait(
    channel: ReplicaChannel, request: ReplicaRequest, done: Sequence[str], wait: bool, timeout_s: float, console: Console
) -> int:
    """Send a start or a stop and print the answer; with ``wait``, ask until the replica's state
    is one of ``done`` and print it (exit status 0 when it is the first). The command's exit status."""
    replica_id = request.replica_id
    answer = await channel.send(request)
    if isinstance(answer.reply, Refused):
        return _refused(answer, answer.reply)
    assert isinstance(answer.reply, ReplicaStatusReply)
    console.print(f"replica {replica_id} on {_node_words(answer)}: {answer.reply}", markup=False)
    if not wait:
        return 0
    final = await _wait_for_state(channel, answer, replica_id, done, timeout_s)
    return _print_final(final, replica_id, done[0], timeout_s, console)


def _print_final(answer: ReplicaAnswer, replica_id: str, wanted: str, timeout_s: float, console: Console) -> int:
    reply = answer.reply
    if isinstance(reply, Refused):
        return _refused(answer, reply)
    assert isinstance(reply, ReplicaStatusReply)
    console.print(_status_line(reply), markup=False)
    if reply.state == wanted:
        return 0
    if reply.state not in ("failed", "stopped"):
        _stderr().print(f"replica {replica_id} is not {wanted} after {timeout_s:g} s")
    return EXIT_REFUSED


async def run_replica_stop(
    replica_id: str,
    target: HostPort,
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    wait: bool = True,
    timeout_s: float = 60.0,
    listen: HostPort | None = None,
) -> int:
    """Send a signed StopReplica; by default wait until the replica has stopped."""
    async with open_replica_channel(data_dir, target, listen) as channel:
        request = ReplicaRequest("stop", target[0], target[1], replica_id)
        return await _send_and_wait(channel, request, ("stopped",), wait, timeout_s, console)


async def run_replica_status(
    replica_id: str, target: HostPort, data_dir: str | os.PathLike[str], console: Console, *, listen: HostPort | None = None
) -> int:
    """Print a replica's state on the node at ``target``, then its run, restarts, port and health."""
    async with open_replica_channel(data_dir, target, listen) as channel:
        answer = await channel.send(ReplicaRequest("status", target[0], target[1], replica_id))
    reply = answer.reply
    if isinstance(reply, Refused):
        return _refused(answer, reply)
    assert isinstance(reply, ReplicaStatusReply)
    console.print(f"replica {replica_id} on {_node_words(answer)}: {reply}", markup=False)
    port = "none" if reply.port is None else str(reply.port)
    console.print(
        f"run {reply.run}, restarts {reply.restarts}, port {port}, {'healthy' if reply.healthy else 'not healthy'}"
    )
    return 0


async def run_replica_logs(
    replica_id: str,
    target: HostPort,
    max_bytes: int,
    data_dir: str | os.PathLike[str],
    *,
    listen: HostPort | None = None,
) -> int:
    """Write the last ``max_bytes`` of the replica's logs (stdout and stderr, interleaved) to stdout."""
    async with open_replica_channel(data_dir, target, listen) as channel:
        answer = await channel.send(ReplicaRequest("logs", target[0], target[1], replica_id, max_bytes=max_bytes))
    reply = answer.reply
    if isinstance(reply, Refused):
        return _refused(answer, reply)
    assert isinstance(reply, LogsReply)
    out = sys.stdout.buffer
    out.write(reply.data)
    out.flush()
    return 0
