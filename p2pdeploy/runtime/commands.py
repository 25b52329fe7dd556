"""The bodies of ``p2pdeploy join`` and ``p2pdeploy ping``: a node in the foreground, narrated with rich.

``cli.py`` parses options and calls these inside ``trio.run``. Lines a script reads are plain
and stable: ``node id HEX``, ``listening on HOST:PORT``, ``joined via HOST:PORT ...``,
``peer HEX at HOST:PORT``, ``stopped``; for ``ping``, ``pong from HEX at HOST:PORT: seq=N ...``.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console

from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.ping import PeerSeen, Ping
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.node import PingTimeout, RuntimeNode, open_node


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/p2pdeploy``, by default ``~/.local/share/p2pdeploy``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "p2pdeploy"


def make_console() -> Console:
    # soft_wrap: a long line is never folded, so scripts can read it whatever the width.
    return Console(soft_wrap=True, highlight=False)


async def run_join(
    listen: HostPort,
    bootstrap: Sequence[HostPort],
    data_dir: str | os.PathLike[str],
    console: Console,
) -> None:
    """Run a node until SIGINT or SIGTERM, then stop it cleanly."""
    # Signals are caught from before the node exists, so a SIGTERM right after the
    # "listening on" line still stops it gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        identity, created = Identity.load_or_create(data_dir)
        key_path = Path(data_dir) / "identity.key"
        async with open_node(listen, identity=identity, bootstrap=bootstrap) as node:
            with node.subscribe() as events:
                console.print(f"node id [bold]{node.node_id_hex}[/]")
                console.print(f"[dim]identity {'created in' if created else 'loaded from'} {key_path}[/]")
                console.print(f"listening on [bold]{format_host_port(node.address)}[/] [dim](udp and tcp)[/]")
                if not bootstrap:
                    console.print("[dim]no --bootstrap: this node starts a community; others join via it[/]")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_report_peers, events, console)
                    nursery.start_soon(_report_join, node, console)
                    async for signum in signals:
                        console.print(f"stopping on {signal.Signals(signum).name}")
                        break
                    nursery.cancel_scope.cancel()
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
