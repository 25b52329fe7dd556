"""The bodies of the ``p2pdeploy`` node commands, narrated with rich.

``join`` runs a node in the foreground, with its control socket in the data directory;
``ping`` runs an ephemeral node; ``put``, ``get``, ``lookup`` and ``status`` talk to the running
``join`` node of a data directory through its control socket (:mod:`~p2pdeploy.runtime.control`).

``cli.py`` parses options and calls these inside ``trio.run``. Lines a script reads are plain
and stable: ``node id HEX``, ``listening on HOST:PORT``, ``control socket PATH``,
``joined via HOST:PORT ...``, ``overlay joined: N contacts``, ``peer HEX at HOST:PORT``,
``stopped``; for ``ping``, ``pong from HEX at HOST:PORT: seq=N ...``; for ``put``,
``stored NAME (key HEX) on N nodes``; ``get`` prints the value alone; ``lookup`` prints one
``HEX HOST:PORT`` line per contact, closest first.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.ping import PeerSeen, Ping
from p2pdeploy.overlay.storage import Item
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.control import (
    ControlSocket,
    GetReply,
    GetRequest,
    LookupReply,
    LookupRequest,
    PutReply,
    PutRequest,
    StatusReply,
    StatusRequest,
    control_request,
)
from p2pdeploy.runtime.node import PingTimeout, RuntimeConfig, RuntimeNode, open_node

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
) -> None:
    """Run a node until SIGINT or SIGTERM, then stop it cleanly."""
    # Signals are caught from before the node exists, so a SIGTERM right after the
    # "listening on" line still stops it gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        identity, created = Identity.load_or_create(data_dir)
        key_path = Path(data_dir) / "identity.key"
        # The control socket first: a second node on the same data dir stops here, before binding ports.
        control = await ControlSocket.bind(data_dir)
        try:
            async with open_node(listen, identity=identity, data_dir=data_dir, bootstrap=bootstrap, config=config) as node:
                with node.subscribe() as events:
                    console.print(f"node id [bold]{node.node_id_hex}[/]")
                    console.print(f"[dim]identity {'created in' if created else 'loaded from'} {key_path}[/]")
                    if node.restored_contacts:
                        console.print(
                            f"[dim]routing table: {node.restored_contacts} contacts restored from {node.snapshot_path}[/]"
                        )
                    console.print(f"listening on [bold]{format_host_port(node.address)}[/] [dim](udp and tcp)[/]")
                    if not bootstrap and not node.restored_contacts:
                        console.print("[dim]no --bootstrap: this node starts a community; others join via it[/]")
                    async with trio.open_nursery() as nursery:
                        await nursery.start(control.serve, node)
                        console.print(f"control socket {control.path}")
                        nursery.start_soon(_report_peers, events, console)
                        nursery.start_soon(_report_join, node, console)
                        async for signum in signals:
                            console.print(f"stopping on {signal.Signals(signum).name}")
                            break
                        nursery.cancel_scope.cancel()
        finally:
            control.close()
    console.print("stopped")


async def _report_peers(events: trio.MemoryReceiveChannel[object], console: Console) -> None:
    async for event in events:
        if isinstance(event, PeerSeen):
            console.print(f"peer [bold]{event.node_id:040x}[/] at {format_host_port(event.address)}")


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


async def run_status(data_dir: str | os.PathLike[str], console: Console) -> int:
    """Show the node's id, address, routing table, store and counters as a table."""
    with trio.fail_after(CONTROL_TIMEOUT_S):
        status: StatusReply = await control_request(data_dir, StatusRequest())
    table = Table(title=f"node of {status.data_dir or data_dir}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("node id", f"{status.node_id:040x}")
    table.add_row("address", format_host_port((status.host, status.port)))
    table.add_row("uptime", f"{status.uptime_s:.1f} s")
    table.add_row("contacts", f"{status.contacts} in {status.buckets} buckets ({status.restored_contacts} restored)")
    table.add_row("stored items", str(status.stored_items))
    table.add_row("published items", str(status.published_items))
    console.print(table)
    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name in sorted(status.counters):
        counters.add_row(name, str(status.counters[name]))
    console.print(counters)
    return 0
