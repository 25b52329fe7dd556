"""The bodies of the ``p2pdeploy`` node commands, narrated with rich.

``join`` runs a node in the foreground, with its control socket in the data directory, and
hosts replicas within the owner's contribution; ``ping`` runs an ephemeral node; ``put``,
``get``, ``lookup`` and ``status`` talk to the running ``join`` node of a data directory through
its control socket (:mod:`~p2pdeploy.runtime.control`). ``key`` and ``bundle`` use the data
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

import datetime
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy.fabric.contribution import (
    ANY,
    KNOWN_KEYS,
    Contribution,
    ContributionError,
)
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.supervisor import ReplicaState, ReplicaStateChanged
from p2pdeploy.fabric.units import format_bandwidth, format_cores, format_cores_number, format_size
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.ping import PeerSeen, Ping
from p2pdeploy.overlay.storage import Item
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
    MAX_CONTROL_BLOB_BYTES,
    BlobGetReply,
    BlobGetRequest,
    BlobPutReply,
    BlobPutRequest,
    ControlClient,
    ControlRequestRefused,
    ControlSocket,
    DetectorStatus,
    GetReply,
    GetRequest,
    LookupReply,
    LookupRequest,
    NoNodeRunning,
    PutReply,
    PutRequest,
    ReplicaAnswer,
    ReplicaRequest,
    StatusReply,
    StatusRequest,
    control_request,
    open_control,
    serve_replica_request,
)
from p2pdeploy.runtime.executor import service_user_cannot_enter
from p2pdeploy.runtime.keyfile import key_path, load_or_create_identity
from p2pdeploy.runtime.node import PingTimeout, RemoteTimeout, RuntimeConfig, RuntimeNode, open_node
from p2pdeploy.runtime.snapshot import write_file_atomically

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long ``put``/``get``/``lookup``/``status`` wait for the node; an overlay query ends on its own well before.
CONTROL_TIMEOUT_S = 120.0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/p2pdeploy``, by default ``~/.local/share/p2pdeploy``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "p2pdeploy"


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
        problem = service_user_cannot_enter(executor.root, executor.uid, executor.gid)
        if problem is not None:
            console.print(
                f"[yellow]services cannot run from {executor.root}[/]: {problem}; "
                "start the node with --replicas-dir on a path every user can enter, "
                "e.g. /var/lib/p2pdeploy/replicas"
            )


def contribution_table(contribution: Contribution, machine: Machine | None, replicas_dir: Path | None) -> Table:
    """What a node offers; with ``machine``, beside what the machine has."""
    table = Table(title="contribution (what this node offers)", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("offered", overflow="fold")
    if machine is not None:
        table.add_column("this machine", style="dim")
    c = contribution

    def row(what: str, offered: str, has: str = "") -> None:
        table.add_row(what, offered, *([has] if machine is not None else []))

    row("cpu", format_cores(c.cpu_cores), f"of {format_cores_number(machine.cores)}" if machine else "")
    row("memory", format_size(c.memory_bytes), f"of {format_size(machine.memory_total_bytes)}" if machine else "")
    row("disk", format_size(c.disk_bytes), f"of {format_size(machine.disk_free_bytes)} free" if machine else "")
    row("bandwidth", "not metered" if c.bandwidth_bps is None else format_bandwidth(c.bandwidth_bps))
    row("services", f"at most {c.max_services}")
    if c.trusted_keys == ANY:
        trusts = "any key (an open community)"
    elif not c.trusted_keys:
        trusts = "nobody but this node's own key"
    else:
        trusts = ", ".join(f"{key.hex()[:16]}…" for key in sorted(c.trusted_keys))
    row("trusts", trusts)
    row("allowed tags", "any" if c.allowed_tags == ANY else ", ".join(sorted(c.allowed_tags)) or "none")
    row("tags", ", ".join(sorted(c.tags)) or "none")
    if c.owner:
        row("owner", c.owner)
    if replicas_dir is not None:
        row("replicas in", str(replicas_dir))
    return table


async def _report_events(events: trio.MemoryReceiveChannel[object], node: RuntimeNode, console: Console) -> None:
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
        elif isinstance(event, ReplicaStartAccepted):
            console.print(
                f"[dim]accepted {event.service} {event.version} as {event.replica_id} "
                f"from key {event.signer.hex()[:16]}…[/]"
            )
        elif isinstance(event, RequestRefused):
            where = format_host_port(event.src) if isinstance(event.src, tuple) else str(event.src)
            console.print(f"refused {event.request} from {where}: {event.reason}", markup=False)


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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def key_of_name(name: str) -> int:
    """The overlay key of a NAME given on the command line."""
    return key_id(name.encode())


async def run_put(
    name: str, value: bytes, ttl_s: float | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Store VALUE under NAME through the node of ``data_dir``; exit status 0 when any node stored it."""
    key = key_of_name(name)
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: PutReply = await control_request(data_dir, PutRequest(key, Item(value), ttl_s))
    if reply.stored == 0:
        reasons = "; ".join(sorted(set(reply.refusals))) or "no node answered"
        console.print(f"[red]{name} was stored on no node[/] (key {key:040x}): {reasons}")
        return 1
    console.print(f"stored {name} (key {key:040x}) on {_count(reply.stored, 'node')}")
    return 0


async def run_get(name: str, data_dir: str | os.PathLike[str], console: Console) -> int:
    """Print the value under NAME (the bytes, then a newline); exit status 1 when none is found."""
    key = key_of_name(name)
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: GetReply = await control_request(data_dir, GetRequest(key))
    if reply.item is None:
        Console(stderr=True, highlight=False).print(f"{name} not found (key {key:040x})")
        return 1
    out = sys.stdout.buffer
    out.write(reply.item.value + b"\n")
    out.flush()
    return 0


def blob_id_of(text: str) -> int:
    """A blob id given on the command line: the 40 hex digits ``blob put`` printed."""
    cleaned = text.strip().lower().removeprefix("0x")
    if len(cleaned) != 40 or any(ch not in "0123456789abcdef" for ch in cleaned):
        raise ValueError(f"a blob id is 40 hex digits, as `p2pdeploy blob put` prints it (got {text!r})")
    return int(cleaned, 16)


async def run_blob_put(
    path: str | os.PathLike[str], replicas: int | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Store a file as a content-addressed blob (chunks replicated on the nodes closest to each
    chunk's id) through the node of ``data_dir``; print its id. Exit status 1 when not stored."""
    source = Path(path)
    size = source.stat().st_size
    if size > MAX_CONTROL_BLOB_BYTES:
        console.print(f"[red]{source} has {format_size(size)}; `blob put` carries at most "
                      f"{format_size(MAX_CONTROL_BLOB_BYTES)}[/]")
        return 2
    data = source.read_bytes()
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: BlobPutReply = await control_request(data_dir, BlobPutRequest(data, replicas))
    if reply.reason:
        console.print(f"[red]{source} was not stored[/]: {reply.reason}")
        return 1
    console.print(f"stored {source.name} ({format_size(reply.size)}, {_count(reply.chunks, 'chunk')}, "
                  f"{reply.replicas} {'copy' if reply.replicas == 1 else 'copies'} of each)")
    console.print(f"blob {reply.blob_id:040x}")
    return 0


async def run_blob_get(
    blob_id: str, out: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str], console: Console
) -> int:
    """Fetch a blob (every chunk checked against its hash) to ``out``, or to standard output."""
    key = blob_id_of(blob_id)
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: BlobGetReply = await control_request(data_dir, BlobGetRequest(key))
    if reply.data is None:
        Console(stderr=True, highlight=False).print(f"blob {key:040x} not fetched: {reply.reason or 'not found'}")
        return 1
    if out is None:
        sys.stdout.buffer.write(reply.data)
        sys.stdout.buffer.flush()
    else:
        write_file_atomically(Path(out), reply.data, mode=0o644)
        console.print(f"fetched blob {key:040x} ({format_size(len(reply.data))}) to {out}")
    return 0


async def run_lookup(name: str, data_dir: str | os.PathLike[str], console: Console) -> int:
    """Print the nodes closest to NAME's key, closest first, as ``HEX HOST:PORT`` lines."""
    key = key_of_name(name)
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: LookupReply = await control_request(data_dir, LookupRequest(key))
    console.print(
        f"[dim]{_count(len(reply.contacts), 'node')} closest to {name} (key {key:040x}), closest first, "
        f"{_count(reply.hops, 'hop')}, {_count(reply.requests, 'request')}:[/]"
    )
    for contact in reply.contacts:
        address = contact.address
        where = format_host_port(address) if isinstance(address, tuple) else str(address)
        distance_bits = (contact.node_id ^ key).bit_length()
        console.print(f"{contact.node_id:040x} {where} [dim](distance < 2^{distance_bits})[/]")
    return 0 if reply.contacts else 1


def status_to_json(status: StatusReply) -> dict[str, Any]:
    """``status`` as plain JSON values: node ids as 40 hex digits, bytes as hex."""

    def plain(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {name: plain(item, name) for name, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        if isinstance(value, bytes):
            return value.hex()
        if key == "node_id" and isinstance(value, int):
            return f"{value:040x}"
        return value

    return plain(asdict(status))


def detector_table(detector: DetectorStatus) -> Table:
    """The failure detector's view: whom it watches, suspects and holds dead, its health and counters."""
    counters = detector.counters
    table = Table(
        title=f"failure detector: {_count(detector.watched, 'peer')} watched, {len(detector.suspects)} suspect, "
        f"{len(detector.dead)} dead",
        title_justify="left",
    )
    for column in ("peer", "state", "incarnation", "since"):
        table.add_column(column)
    for peer in [*detector.suspects, *detector.dead]:
        when = datetime.datetime.fromtimestamp(peer.since_unix_s).strftime("%H:%M:%S")
        table.add_row(f"{peer.node_id:040x}", peer.state, str(peer.incarnation), f"{when} ({peer.for_s:.1f} s ago)")
    table.caption = f"local health {detector.health} (0 is healthy), incarnation {detector.incarnation}; " + ", ".join(
        f"{name} {counters[name]}" for name in sorted(counters)
    )
    table.caption_justify = "left"
    return table


async def run_status(data_dir: str | os.PathLike[str], console: Console, *, as_json: bool = False) -> int:
    """Show the node's id, address, routing table, store, failure detector and counters as tables
    (``as_json``: one JSON object instead)."""
    with trio.fail_after(CONTROL_TIMEOUT_S):
        status: StatusReply = await control_request(data_dir, StatusRequest())
    if as_json:
        console.print(json.dumps(status_to_json(status)), markup=False, highlight=False, soft_wrap=True)
        return 0
    table = Table(title=f"node of {status.data_dir or data_dir}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("node id", f"{status.node_id:040x}")
    table.add_row("address", format_host_port((status.host, status.port)))
    table.add_row("uptime", f"{status.uptime_s:.1f} s")
    table.add_row("contacts", f"{status.contacts} in {status.buckets} buckets ({status.restored_contacts} restored)")
    table.add_row("stored items", str(status.stored_items))
    table.add_row("published items", str(status.published_items))
    if status.persistence is not None:
        held = status.persistence
        table.add_row("persistence", f"{_count(held.get('chunks', 0), 'chunk')} "
                      f"({format_size(held.get('bytes_used', 0))} of {format_size(held.get('capacity_bytes', 0))}), "
                      f"{_count(held.get('records', 0), 'record')}")
    if status.state_url:
        table.add_row("state API", status.state_url)
    console.print(table)
    if status.contribution is not None:
        try:
            contribution = Contribution.from_table(status.contribution, source="the node's status")
        except ContributionError:
            contribution = None
        if contribution is not None:
            replicas_dir = Path(status.replicas_dir) if status.replicas_dir else None
            console.print(contribution_table(contribution, None, replicas_dir))
        replicas = Table(title=f"replicas ({len(status.replicas)})", title_justify="left")
        for column in ("replica", "state", "port", "run", "restarts", "started by"):
            replicas.add_column(column)
        for replica in status.replicas:
            state = f"{replica.state}: {replica.reason}" if replica.reason else replica.state
            replicas.add_row(
                replica.replica_id, state, "" if replica.port is None else str(replica.port), str(replica.run),
                str(replica.restarts), f"{replica.requested_by.hex()[:16]}…" if replica.requested_by else "",
            )  # fmt: skip
        console.print(replicas)
    if status.detector is not None:
        console.print(detector_table(status.detector))
    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name in sorted(status.counters):
        counters.add_row(name, str(status.counters[name]))
    console.print(counters)
    return 0


# -- the contribution of a join node -------------------------------------------------------

#: The ``join`` option that sets each key of the ``[contribution]`` table.
CONTRIBUTION_OPTIONS = {
    "cpu": "--cpu", "memory": "--memory", "disk": "--disk", "bandwidth": "--bandwidth",
    "max_services": "--max-services", "trusted_keys": "--trust", "allowed_tags": "--allow-tag",
    "tags": "--tag", "owner": "--owner",
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
        answer = await channel.send(request)
        if isinstance(answer.reply, Refused):
            return _refused(answer, answer.reply)
        assert isinstance(answer.reply, ReplicaStatusReply)
        console.print(f"replica {replica_id} on {_node_words(answer)}: {answer.reply}", markup=False)
        if not wait:
            return 0
        final = await _wait_for_state(channel, answer, replica_id, ("running", "failed", "stopped"), timeout_s)
    return _print_final(final, replica_id, "running", timeout_s, console)


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
        answer = await channel.send(ReplicaRequest("stop", target[0], target[1], replica_id))
        if isinstance(answer.reply, Refused):
            return _refused(answer, answer.reply)
        assert isinstance(answer.reply, ReplicaStatusReply)
        console.print(f"replica {replica_id} on {_node_words(answer)}: {answer.reply}", markup=False)
        if not wait:
            return 0
        final = await _wait_for_state(channel, answer, replica_id, ("stopped",), timeout_s)
    return _print_final(final, replica_id, "stopped", timeout_s, console)


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
