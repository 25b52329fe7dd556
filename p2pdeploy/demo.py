"""``make demo``: a local community of node processes on loopback, narrated step by step.

Five ``p2pdeploy join`` processes start on 127.0.0.1 with OS-chosen ports and temporary data
directories; nodes 2-5 join through node 1. Each step below shows one capability working
across real processes; a new capability adds its step to :data:`STEPS` (before ``leave``,
which stops every node with SIGTERM and checks that each exited cleanly). Whatever happens,
every process is killed and every directory removed at the end.

Run it with ``python -m p2pdeploy.demo`` (``--nodes N`` for another community size).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.localnet import (
    JoinProcess,
    LocalProcesses,
    ProcessOutputError,
    open_local_processes,
    run_p2pdeploy,
)
from p2pdeploy.runtime.node import PingTimeout, open_node
from p2pdeploy.runtime.transport import bind_udp_and_tcp

LARGE_PING_PAYLOAD_BYTES = 64 * 1024


@dataclass
class Community:
    """What the steps share: the running processes, where they keep their data, the console."""

    local: LocalProcesses
    base_dir: Path
    console: Console
    size: int

    @property
    def nodes(self) -> list[JoinProcess]:
        return self.local.processes

    def address_of(self, node: JoinProcess) -> HostPort:
        assert node.address is not None, f"{node.name} has not started"
        return node.address


@dataclass(frozen=True)
class Step:
    name: str
    #: One sentence for the reader: what this step shows.
    shows: str
    run: Callable[[Community], Awaitable[None]]


def _short(node_id_hex: str | None) -> str:
    return f"{node_id_hex[:12]}…" if node_id_hex else "?"


async def join(community: Community) -> None:
    console = community.console
    first = await community.local.start_join(community.base_dir / "node-1", name="node 1")
    first_address = await first.wait_listening()
    console.print(f"node 1 listens on {format_host_port(first_address)} and starts the community")
    others = [
        await community.local.start_join(
            community.base_dir / f"node-{i}", bootstrap=[first_address], name=f"node {i}"
        )
        for i in range(2, community.size + 1)
    ]
    console.print(f"started nodes 2-{community.size} with --bootstrap {format_host_port(first_address)}")

    bootstrap_rtt_ms: dict[str, str] = {}
    for node in others:
        await node.wait_listening()
        line = await node.wait_for_line(lambda line: line.startswith(("joined via", "bootstrap ")))
        bootstrap_rtt_ms[node.name] = line.partition("rtt ")[2].rstrip(")") or "no answer"
    # Node 1 learns of each newcomer from its first ping: wait until it has reported them all.
    expected = {node.node_id_hex for node in others}
    await first.wait_until(lambda node: expected <= set(node.peers_seen()))

    table = Table(title="the community", title_justify="left")
    table.add_column("node")
    table.add_column("id")
    table.add_column("address")
    table.add_column("joined via node 1 (bootstrap rtt)")
    table.add_row("node 1", _short(first.node_id_hex), format_host_port(first_address), "(first node)")
    for node in others:
        table.add_row(
            node.name,
            _short(node.node_id_hex),
            format_host_port(community.address_of(node)),
            bootstrap_rtt_ms[node.name],
        )
    console.print(table)
    console.print(f"node 1 has heard from all {len(others)} newcomers (its `peer … at …` lines)")


async def ping(community: Community) -> None:
    console = community.console
    console.print(
        "a probe node in this process (identity in memory, port chosen by the OS) pings every member: "
        f"an empty ping fits one UDP datagram, a {LARGE_PING_PAYLOAD_BYTES // 1024} KiB one goes by TCP"
    )
    table = Table(title="round-trip times from the probe", title_justify="left")
    table.add_column("node")
    table.add_column("answered as")
    table.add_column("udp rtt", justify="right")
    table.add_column(f"tcp rtt ({LARGE_PING_PAYLOAD_BYTES // 1024} KiB)", justify="right")
    large_payload = bytes(LARGE_PING_PAYLOAD_BYTES)
    async with open_node(("127.0.0.1", 0)) as probe:
        for node in community.nodes:
            address = community.address_of(node)
            cells = []
            answered_as = "?"
            for payload in (b"", large_payload):
                try:
                    pong = await probe.ping_pong(address, payload, timeout_s=5.0)
                except PingTimeout as exc:
                    cells.append(f"[red]{exc}[/]")
                else:
                    answered_as = _short(f"{pong.node_id:040x}")
                    cells.append(f"{pong.rtt_s * 1000:.3f} ms")
            table.add_row(node.name, answered_as, *cells)
        console.print(table)
        counters = probe.counters
        console.print(
            f"probe traffic: {counters['udp_sent']} datagrams out, {counters['udp_received']} in; "
            f"{counters['tcp_sent']} stream frames out, {counters['tcp_received']} in"
        )
    example = format_host_port(community.address_of(community.nodes[0]))
    console.print(
        f"[dim]from a shell: p2pdeploy ping {example} --payload-bytes {LARGE_PING_PAYLOAD_BYTES}[/]"
    )


LOOKUP_LINE = re.compile(r"^([0-9a-f]{40}) (\S+)")


async def _cli(community: Community, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run and echo ``p2pdeploy ARGS`` (data directories shown relative to the demo's base)."""
    shown = [arg.replace(str(community.base_dir) + "/", "") for arg in args]
    community.console.print(f"[bold]$ p2pdeploy {shlex.join(shown)}[/]")
    result = await run_p2pdeploy(*args)
    for line in result.stdout.decode(errors="replace").splitlines():
        community.console.print(f"  {line}", markup=False, soft_wrap=True)
    if result.returncode != 0:
        raise ProcessOutputError(
            f"p2pdeploy {shlex.join(shown)} exited {result.returncode}\n"
            + (result.stdout + result.stderr).decode(errors="replace")
        )
    return result


async def overlay(community: Community) -> None:
    console = community.console
    nodes = community.nodes
    for node in nodes:
        await node.wait_for_line(lambda line: line.startswith("overlay joined"))
    writer, looker = nodes[1], nodes[0]
    reader = nodes[-1] if len(nodes) > 2 else nodes[0]
    console.print(
        f"{writer.name} stores a value through the CLI, which talks to its running node over the "
        f"control socket in its data directory; {reader.name} reads it back from the overlay"
    )
    await _cli(community, "put", "greeting", f"hello from {writer.name}", "--data-dir", str(writer.data_dir))
    got = await _cli(community, "get", "greeting", "--data-dir", str(reader.data_dir))
    if got.stdout != f"hello from {writer.name}\n".encode():
        raise ProcessOutputError(f"{reader.name} read {got.stdout!r}")
    console.print(f"{looker.name} looks up the nodes closest to the key of `greeting`:")
    found = await _cli(community, "lookup", "greeting", "--data-dir", str(looker.data_dir))
    names = {node.node_id_hex: node.name for node in nodes}
    table = Table(title="closest to key_id(b'greeting'), by XOR distance", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("node")
    table.add_column("id")
    table.add_column("address")
    rank = 0
    for line in found.stdout.decode().splitlines():
        match = LOOKUP_LINE.match(line)
        if match:
            rank += 1
            table.add_row(str(rank), names.get(match.group(1), "?"), _short(match.group(1)), match.group(2))
    console.print(table)
    console.print(
        "[dim]each node keeps its routing table in DATA_DIR/routing.cbor and rejoins through it after a restart[/]"
    )


async def leave(community: Community) -> None:
    console = community.console
    for node in community.nodes:
        node.terminate()
    console.print(f"sent SIGTERM to all {len(community.nodes)} nodes")
    table = Table(title="shutdown", title_justify="left")
    table.add_column("node")
    table.add_column("exit status", justify="right")
    table.add_column("last words")
    table.add_column("address free again")
    failures = []
    for node in community.nodes:
        status = await node.wait_exit()
        last = node.stdout_lines[-1] if node.stdout_lines else ""
        free = await _address_is_free(community.address_of(node))
        table.add_row(node.name, str(status), last, "yes" if free else "[red]no[/]")
        if status != 0 or last != "stopped" or not free:
            failures.append(node)
    console.print(table)
    if failures:
        raise ProcessOutputError("\n".join(node.transcript() for node in failures))
    console.print("every node stopped cleanly: exit status 0, and its UDP and TCP port can be bound again")


async def _address_is_free(address: HostPort) -> bool:
    """Whether UDP and TCP can both bind ``address``: the node that had it closed its sockets."""
    try:
        udp, tcp = await bind_udp_and_tcp(*address)
    except OSError:
        return False
    udp.close()
    tcp.close()
    return True


#: What works so far, in order. A new capability adds its step before ``leave``.
STEPS: list[Step] = [
    Step("join", "node processes start, create identities and join through node 1", join),
    Step("ping", "ping/pong with RTT estimation, by UDP and by TCP", ping),
    Step("overlay", "the Kademlia overlay stores a value on one node and finds it from another", overlay),
    Step("leave", "SIGTERM stops every node gracefully", leave),
]


async def run_demo(console: Console, size: int = 5) -> bool:
    """Run every step; True when all of them worked."""
    console.rule(f"[bold]p2pdeploy demo: a community of {size} nodes on loopback")
    with tempfile.TemporaryDirectory(prefix="p2pdeploy-demo-") as base_dir:
        console.print(f"[dim]data directories under {base_dir} (removed at the end)[/]")
        started = trio.current_time()
        try:
            async with open_local_processes() as local:
                community = Community(local, Path(base_dir), console, size)
                for number, step in enumerate(STEPS, start=1):
                    console.rule(f"step {number}/{len(STEPS)}: {step.name}", align="left")
                    console.print(f"[italic]{step.shows}[/]")
                    await step.run(community)
        except (ProcessOutputError, OSError) as exc:
            console.print(f"[bold red]demo failed[/]: {exc}")
            return False
        console.rule(f"[bold green]all {len(STEPS)} steps worked in {trio.current_time() - started:.1f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pdeploy.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5, help="community size (default 5)")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    console = Console(highlight=False)
    return 0 if trio.run(run_demo, console, args.nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
