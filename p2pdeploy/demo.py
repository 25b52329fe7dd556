"""``make demo``: a local community of node processes on loopback, narrated step by step.

Five ``p2pdeploy join`` processes start on 127.0.0.1 with OS-chosen ports and temporary data
directories; nodes 2-5 join through node 1, and every node trusts the demo's deployer key
(``--trust``). Each step below shows one capability working across real processes; a new
capability adds its step to :data:`STEPS` (before ``leave``, which stops every node with
SIGTERM and checks that each exited cleanly). Whatever happens, every process is killed and
every directory removed at the end.

Run it with ``python -m p2pdeploy.demo`` (``--nodes N`` for another community size).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy.files import bundle_from_directory, load_or_create_identity, write_signed_bundle
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.control import ServiceStatusRequest, StatusReply, StatusRequest, control_request
from p2pdeploy.runtime.healing_trials import crash, kill_orphans
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
#: The example service the replicas step deploys (in the repository, beside the package).
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class Community:
    """What the steps share: the running processes, where they keep their data, the console."""

    local: LocalProcesses
    base_dir: Path
    console: Console
    size: int
    #: The data directory whose key deploys services; every node trusts it.
    deployer_dir: Path
    deployer_key: str
    #: ``--trust KEY`` for the deployer and every member (made before the nodes start).
    trust_args: list[str]

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
    trust = community.trust_args
    first = await community.local.start_join(community.base_dir / "node-1", name="node 1", extra_args=trust)
    first_address = await first.wait_listening()
    console.print(f"node 1 listens on {format_host_port(first_address)} and starts the community")
    others = [
        await community.local.start_join(
            community.base_dir / f"node-{i}", bootstrap=[first_address], name=f"node {i}", extra_args=trust
        )
        for i in range(2, community.size + 1)
    ]
    console.print(f"started nodes 2-{community.size} with --bootstrap {format_host_port(first_address)}")
    console.print(
        f"every node contributes the defaults (1 core, 1 GiB, 5 GiB of disk, 4 services) and trusts the "
        f"deployer's key (--trust {community.deployer_key[:16]}…) and every member's, since a service's "
        "manager, any member, starts its replicas"
    )

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


async def _cli(community: Community, *args: str, status: int = 0) -> subprocess.CompletedProcess[bytes]:
    """Run and echo ``p2pdeploy ARGS`` (data directories shown relative to the demo's base);
    its output is shown, and standard error too when the command is expected to fail."""
    (result,) = await _cli_at_once(community, (args, status))
    return result


async def _cli_at_once(
    community: Community, *commands: tuple[Sequence[str], int]
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run independent ``p2pdeploy`` commands ``(args, expected status)`` at once; echo them in order."""
    results: list[subprocess.CompletedProcess[bytes] | None] = [None] * len(commands)

    async def run_one(index: int) -> None:
        results[index] = await run_p2pdeploy(*commands[index][0])

    async with trio.open_nursery() as nursery:
        for index in range(len(commands)):
            nursery.start_soon(run_one, index)

    def relative(text: str) -> str:
        return text.replace(str(community.base_dir) + "/", "").replace(str(EXAMPLES_DIR.parent) + "/", "")

    done = []
    for (args, status), result in zip(commands, results, strict=True):
        assert result is not None
        shown = shlex.join(relative(arg) for arg in args)
        community.console.print(f"[bold]$ p2pdeploy {shown}[/]")
        for line in result.stdout.decode(errors="replace").splitlines():
            community.console.print(f"  {relative(line)}", markup=False, soft_wrap=True)
        if status != 0:
            for line in result.stderr.decode(errors="replace").splitlines():
                community.console.print(f"  {relative(line)}", style="red", markup=False, soft_wrap=True)
        if result.returncode != status:
            raise ProcessOutputError(
                f"p2pdeploy {shown} exited {result.returncode}\n"
                + (result.stdout + result.stderr).decode(errors="replace")
            )
        done.append(result)
    return done


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


async def replicas(community: Community) -> None:
    console = community.console
    service = EXAMPLES_DIR / "hello"
    if not (service / "manifest.toml").is_file():
        raise ProcessOutputError(f"{service} not found: run the demo from a checkout of p2pdeploy")
    host_node = community.nodes[-1]
    node = format_host_port(community.address_of(host_node))
    deployer = ["--data-dir", str(community.deployer_dir)]
    bundle = community.base_dir / "hello.tar.gz"
    console.print(
        f"the deployer packs examples/hello and signs it with its key, then asks {host_node.name} to run it; "
        "the request is signed too, and the node checks both signatures, its trust, the service's "
        "requirements and its free contribution before starting it"
    )
    await _cli(community, "bundle", str(service), "--out", str(bundle), *deployer)
    started = await _cli(community, "replica", "start", str(bundle), "--node", node, *deployer)
    port = _port_in(started.stdout.decode())
    response = await _http_get(port)
    console.print(f"[bold]GET http://127.0.0.1:{port}/[/] → {response}")
    console.print(
        "/count keeps a counter in the node's state API (the node handed the service its URL and a token): "
        "a quorum record on the nodes closest to its key, written with compare-and-set"
    )
    for _ in range(2):
        counted = await _http_get(port, "/count")
        if not counted.startswith("HTTP/1.0 200"):
            raise ProcessOutputError(f"GET /count answered {counted}")
        console.print(f"[bold]GET http://127.0.0.1:{port}/count[/] → {counted}")
    stranger = community.base_dir / "stranger.tar.gz"
    write_signed_bundle(stranger, bundle_from_directory(service).sign(Identity.generate()))
    console.print(
        "its status and logs; and a stranger's bundle (its signature is valid, but no node trusts its key) "
        "sent by the trusted deployer (three independent commands, run at once):"
    )
    await _cli_at_once(
        community,
        (("replica", "status", "hello-1", "--node", node, *deployer), 0),
        (("replica", "logs", "hello-1", "--node", node, "--bytes", "400", *deployer), 0),
        (("replica", "start", str(stranger), "--id", "hello-2", "--node", node, *deployer), 1),
    )
    said = await host_node.wait_for_line(lambda line: line.startswith("refused StartReplica"))
    console.print(f"{host_node.name} says: {said}", markup=False)
    await _cli(community, "replica", "stop", "hello-1", "--node", node, *deployer)


REPLICA_PORT = re.compile(r"^replica \S+: running\b.*\(port (\d+)\)", re.M)


def _port_in(output: str) -> int:
    match = REPLICA_PORT.search(output)
    if match is None:
        raise ProcessOutputError(f"no running replica with a port in:\n{output}")
    return int(match.group(1))


async def _http_get(port: int, path: str = "/") -> str:
    """The status line and body of ``GET path`` on the replica's port, on one line."""
    with trio.fail_after(60):  # /count waits for the state API's quorum writes
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return f"{head.splitlines()[0] if head else '?'}: {body.strip()}"


async def persistence(community: Community) -> None:
    console = community.console
    nodes = community.nodes
    writer, reader = nodes[1], nodes[-1] if len(nodes) > 2 else nodes[0]
    source = community.base_dir / "data.bin"
    data = random.Random(7).randbytes(1024 * 1024)
    source.write_bytes(data)
    console.print(
        f"{writer.name} stores a 1 MiB file as a blob: 4 chunks of 256 KiB, each named by its SHA-256 and "
        f"kept on the 3 nodes closest to that name; {reader.name} fetches it, checking every chunk's hash"
    )
    stored = await _cli(community, "blob", "put", str(source), "--data-dir", str(writer.data_dir))
    match = re.search(r"^blob ([0-9a-f]{40})$", stored.stdout.decode(), re.M)
    if match is None:
        raise ProcessOutputError(f"no blob id in:\n{stored.stdout.decode()}")
    fetched = community.base_dir / "fetched.bin"
    await _cli(community, "blob", "get", match.group(1), "--out", str(fetched), "--data-dir", str(reader.data_dir))
    same = fetched.read_bytes() == data
    console.print(
        f"sha256 stored  {hashlib.sha256(data).hexdigest()[:16]}…\n"
        f"sha256 fetched {hashlib.sha256(fetched.read_bytes()).hexdigest()[:16]}… "
        + ("[green](byte-identical)[/]" if same else "[red](different!)[/]")
    )
    if not same:
        raise ProcessOutputError("the fetched blob differs from the stored file")
    console.print("[dim]each node keeps chunks and records in DATA_DIR/persistence (SQLite and files by hash); "
                  "beyond a small quota only what a key it trusts signed, which it repairs and, when it leaves, "
                  "hands to the nodes now closest[/]")


async def deploy(community: Community) -> None:
    console = community.console
    owner = community.nodes[1]
    count = min(3, community.size - 1)  # a node must be left to take the replacement
    names = {node.node_id_hex: node.name for node in community.nodes}
    console.print(
        f"{owner.name} deploys examples/hello at {count} replicas. It signs the bundle with its key (the service is "
        "hello@KEY, and only that key may change it), stores it once as a blob and writes the service's "
        f"record on the nodes closest to its key; the closest of them manages it: it finds {count} nodes with "
        "room, of different owners where it can, and starts a replica on each by the bundle's id"
    )
    await _cli(community, "deploy", str(EXAMPLES_DIR / "hello"), "--replicas", str(count),
               "--data-dir", str(owner.data_dir))
    service = f"hello@{load_or_create_identity(owner.data_dir)[0].public_key.hex()}"
    report = await _service_report(service, owner)
    manager = names.get(f"{report.manager.node_id:040x}", "?") if report.manager else "?"
    _replica_table(community, report, f"hello: {count} replicas on {count} nodes, managed by {manager}")
    hosts = {f"{r.host.node_id:040x}" for r in report.replicas if r.state == "running"}
    if len(hosts) != count:
        raise ProcessOutputError(f"{count} replicas on {count} distinct nodes expected, got {len(hosts)} nodes")
    managing = f"{report.manager.node_id:040x}" if report.manager else ""
    # a host that neither manages nor owns the service, where there is one (with 3 nodes there may not be)
    victim = min((n for n in community.nodes if n.node_id_hex in hosts and n.node_id_hex != managing),
                 key=lambda n: n is owner)
    watcher = next(n for n in community.nodes if n is not victim)  # asks for the service's status
    port = await _replica_port(victim)
    for _ in range(2):
        console.print(f"[bold]GET http://127.0.0.1:{port}/count[/] on {victim.name} → {await _http_get(port, '/count')}")
    console.print(f"[bold]kill -9 {victim.name}[/] (pid {victim.pid}) and its replica with it, as a machine that dies")
    started = trio.current_time()
    await crash(victim)
    with trio.fail_after(120):
        while True:
            report = await _service_report(service, watcher)
            healthy = {f"{r.host.node_id:040x}" for r in report.replicas if r.state == "running" and r.healthy}
            if len(healthy - {victim.node_id_hex}) >= count:
                break
            await trio.sleep(0.1)
    took = trio.current_time() - started
    for line in report.decisions[-3:]:
        console.print(f"  [dim]manager: {line.partition(' ')[2]}[/]", markup=True)
    _replica_table(community, report, f"healed: {count} replicas run again, {took:.1f} s after the kill")
    console.print(f"[bold green]the replacement ran healthy {took:.1f} s after the kill[/] (Nomad's defaults take "
                  "about 20 s, Kubernetes' about 6 minutes)")
    newcomer = next(n for n in community.nodes if n.node_id_hex in healthy and n.node_id_hex not in hosts)
    port = await _replica_port(newcomer)
    console.print("the replacement reads the counter its predecessor wrote: the state belongs to the service, "
                  "not to the node")
    console.print(f"[bold]GET http://127.0.0.1:{port}/count[/] on {newcomer.name} → {await _http_get(port, '/count')}")
    console.print(f"{victim.name}'s machine comes back: it starts again from its data directory and rejoins")
    community.local.processes.remove(victim)
    address = await community.nodes[0].wait_listening()
    back = await community.local.start_join(victim.data_dir, bootstrap=[address], name=victim.name,
                                            extra_args=community.trust_args)
    await back.wait_listening()
    await _cli(community, "undeploy", "hello", "--data-dir", str(owner.data_dir))
    with trio.fail_after(60):
        while True:
            statuses = [await _node_status(node) for node in community.nodes]
            if all(r.state == "stopped" for status in statuses for r in status.replicas):
                break
            await trio.sleep(0.2)
    console.print("every replica stopped, every reservation freed")


async def _service_report(service: str, via: JoinProcess) -> Any:
    with trio.fail_after(30):
        while True:
            reply = await control_request(via.data_dir, ServiceStatusRequest(service))
            if reply.report is not None:
                return reply.report
            await trio.sleep(0.2)


async def _node_status(node: JoinProcess) -> StatusReply:
    with trio.fail_after(30):
        return await control_request(node.data_dir, StatusRequest())


async def _replica_port(node: JoinProcess) -> int:
    status = await _node_status(node)
    ports = [r.port for r in status.replicas if r.state == "running" and r.port]
    if not ports:
        raise ProcessOutputError(f"{node.name} runs no replica with a port")
    return ports[0]


def _replica_table(community: Community, report: Any, title: str) -> None:
    names = {node.node_id_hex: node.name for node in community.nodes}
    table = Table(title=title, title_justify="left")
    for column in ("replica", "node", "state"):
        table.add_column(column)
    for replica in report.replicas:
        state = replica.state + (" (healthy)" if replica.healthy and replica.state == "running" else "")
        table.add_row(replica.replica_id, names.get(f"{replica.host.node_id:040x}", "?"), state)
    community.console.print(table)


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
    left = kill_orphans(community.base_dir)
    if left:
        raise ProcessOutputError(f"{left} process groups were still running under the demo's directory")
    console.print("every node stopped cleanly: exit status 0, its UDP and TCP port can be bound again, and no "
                  "process runs in the demo's directories")


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
    Step(
        "replicas",
        "a trusted deployer runs a signed service on a node; a stranger's bundle is refused",
        replicas,
    ),
    Step("persistence", "a file stored as a replicated blob on one node is fetched byte-identical on another",
         persistence),
    Step("deploy", "a service deployed once at 3 replicas heals itself when a host is killed, its state kept",
         deploy),
    Step("leave", "SIGTERM stops every node gracefully", leave),
]


async def run_demo(console: Console, size: int = 5) -> bool:
    """Run every step; True when all of them worked."""
    console.rule(f"[bold]p2pdeploy demo: a community of {size} nodes on loopback")
    with tempfile.TemporaryDirectory(prefix="p2pdeploy-demo-") as base_dir:
        console.print(f"[dim]data directories under {base_dir} (removed at the end)[/]")
        # Services run as `nobody` under a root node: it must be able to enter the replicas' directories.
        Path(base_dir).chmod(0o755)
        deployer_dir = Path(base_dir) / "deployer"
        deployer_key = load_or_create_identity(deployer_dir)[0].public_key.hex()
        members = [load_or_create_identity(Path(base_dir) / f"node-{i}")[0].public_key.hex() for i in range(1, size + 1)]
        trust_args = [arg for key in (deployer_key, *members) for arg in ("--trust", key)]
        started = trio.current_time()
        try:
            async with open_local_processes() as local:
                community = Community(local, Path(base_dir), console, size, deployer_dir, deployer_key, trust_args)
                for number, step in enumerate(STEPS, start=1):
                    console.rule(f"step {number}/{len(STEPS)}: {step.name}", align="left")
                    console.print(f"[italic]{step.shows}[/]")
                    step_started = trio.current_time()
                    await step.run(community)
                    console.print(f"[dim]({step.name}: {trio.current_time() - step_started:.1f} s)[/]")
        except (ProcessOutputError, OSError) as exc:
            console.print(f"[bold red]demo failed[/]: {exc}")
            return False
        console.rule(f"[bold green]all {len(STEPS)} steps worked in {trio.current_time() - started:.1f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pdeploy.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5, help="community size (default 5)")
    args = parser.parse_args(argv)
    if args.nodes < 3:
        parser.error("--nodes must be at least 3 (a replica's host is killed and another takes its place)")
    console = Console(highlight=False)
    return 0 if trio.run(run_demo, console, args.nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
