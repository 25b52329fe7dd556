"""Self-healing on a loopback community: how long a service stays short of a replica.

``--nodes`` ``p2pdeploy join`` processes with default settings (each trusts every member's key)
run ``examples/hello`` at ``--replicas`` replicas, deployed from one node. Then, ``--kills``
times, a node hosting a replica (not the manager) is killed with SIGKILL; the time is from the
kill until the service's manager reports the desired count running and healthy without it (the
node then starts again from its data directory). Then a host is paused 2 s (SIGSTOP) and must
not be replaced, the manager itself is killed, a non-owner's undeploy is refused and the
owner's undeploy stops every replica.

Beside it, the published defaults of two schedulers for the same event:
Nomad (a client node missing its heartbeat: ``heartbeat_grace`` 10 s past a TTL of at least
10 s, then the evaluation places the allocation elsewhere: about 20 s) and Kubernetes (a node
``NotReady`` after ``node-monitor-grace-period`` 40 s, its pods evicted after the taint
tolerance of 300 s: about 6 minutes).

    python benchmarks/bench_self_healing.py [--nodes 10] [--replicas 3] [--kills 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy.files import bundle_from_directory
from p2pdeploy.runtime.control import ControlRequestRefused, DeployRequest, UndeployRequest, control_request
from p2pdeploy.runtime.healing_trials import (
    healthy_hosts,
    kill_host,
    kill_manager,
    node_statuses,
    pause_host,
    report_of,
    start_healing_community,
    stop_community,
    wait_healthy,
)
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.localnet import open_local_processes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello"
NOMAD_S = 20.0
KUBERNETES_S = 340.0


async def run(nodes: int, replicas: int, kills: int, console: Console) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o711)  # a root node runs each service as its own user, who must pass through
        async with open_local_processes() as local:
            community = await start_healing_community(local, root, nodes)
            try:
                owner_dir = root / "n1"
                owner = load_or_create_identity(owner_dir)[0]
                bundle = bundle_from_directory(EXAMPLE).sign(owner)
                reply = await control_request(owner_dir, DeployRequest.of(bundle, replicas=replicas))
                assert reply.ok, reply.reason
                service = reply.service
                console.print(f"deployed {service[:20]}… version {reply.version}")
                report = await wait_healthy(community, service, replicas)
                console.print(f"{replicas} replicas healthy on nodes "
                              f"{sorted(community.index_of(h) for h in healthy_hosts(report).values())}")
                times = []
                for round_ in range(1, kills + 1):
                    victim, seconds = await kill_host(community, service, replicas)
                    times.append(seconds)
                    console.print(f"kill {round_}: node {victim} (SIGKILL), replacement healthy after {seconds:.2f} s")
                paused, before, after = await pause_host(community, service, replicas)
                console.print(f"node {paused} paused 2 s: replicas {'unchanged' if before == after else 'CHANGED'}")
                old, new, moved = await kill_manager(community, service, replicas)
                console.print(f"manager node {old} killed: node {new} manages, {replicas} healthy after {moved:.2f} s")
                try:
                    await control_request(root / "n2", UndeployRequest(service))
                    console.print("a non-owner's undeploy was ACCEPTED")
                except ControlRequestRefused as exc:
                    console.print(f"a non-owner's undeploy is refused: {exc.reason}")
                reply = await control_request(owner_dir, UndeployRequest(service.split("@")[0]))
                with trio.fail_after(60):
                    while healthy_hosts(await report_of(community, service)) or any(
                            r.state not in ("stopped",) for s in await node_statuses(community) for r in s.replicas):
                        await trio.sleep(0.2)
                console.print("undeployed: no replica runs on any node")
            finally:
                await stop_community(community)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kills", type=int, default=10)
    options = parser.parse_args()
    console = Console()
    times = trio.run(run, options.nodes, options.replicas, options.kills, console)
    median = statistics.median(times)
    table = Table(title=f"replacement of a killed host's replica: {options.nodes} join processes, "
                        f"{options.replicas} replicas, {len(times)} kills")
    for column in ("", "median", "min", "max", "ratio to p2pdeploy"):
        table.add_column(column, justify="right")
    table.add_row("p2pdeploy (measured)", f"{median:.2f} s", f"{min(times):.2f} s", f"{max(times):.2f} s", "1.0")
    table.add_row("Nomad defaults (published)", f"~{NOMAD_S:.0f} s", "", "", f"{NOMAD_S / median:.1f}")
    table.add_row("Kubernetes defaults (published)", f"~{KUBERNETES_S:.0f} s", "", "", f"{KUBERNETES_S / median:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
