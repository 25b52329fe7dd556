"""Overlay lookups on loopback: p2pdeploy's Kademlia beside the `kademlia` package (asyncio + rpcudp).

Each side runs in a subprocess of its own (trio and asyncio never share a process), starts
``--nodes`` nodes on 127.0.0.1 with k = 20 and alpha = 3 (the package's defaults, and ours),
joins each through the first node, then measures, one operation at a time so a latency is one
operation's:

- ``--lookups`` node lookups of random 160-bit ids from random nodes. p2pdeploy:
  ``await node.lookup(id)``; kademlia: ``NodeSpiderCrawl(...).find()``, the crawl its
  ``Server.set`` runs. *Success* is getting min(k, N-1) contacts; *exact* is getting the true
  k closest other nodes by XOR, checked against every node's id (the reference's departure
  from the paper shows up here, see ARCHITECTURE.md).
- ``--values`` values stored from random nodes, then ``--gets`` reads of random stored keys
  from random nodes (``await node.get`` / ``await server.get``); success is the right value.
  Both sides answer from the local store when they hold the key and cache on the path.

Then one table with a ratio column (p2pdeploy / kademlia; below 1 means p2pdeploy is faster).
The simulator's 10^5-node static network is :func:`bench_simulator`: it builds the network,
answers the lookups in virtual time and prints its figures and peak memory.

    python benchmarks/bench_overlay.py [--nodes 32] [--lookups 1000] [--gets 1000] [--values 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

K = 20
ALPHA = 3
#: An operation slower than this counts as a failure (both sides' RPC timeouts are shorter).
OPERATION_BOUND_S = 30.0
#: A side that takes longer than this in all is stopped.
SIDE_BOUND_S = 900.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize_gets(timed: list[tuple[bool, float]], successes: int, total: int) -> dict[str, Any]:
    """Gets as a whole, plus the share the reader answered from its own store and the others' latency."""
    network = [latency for local, latency in timed if not local]
    return summarize(
        [latency for _, latency in timed],
        successes,
        total,
        local_share=(len(timed) - len(network)) / total if total else float("nan"),
        network_median_ms=statistics.median(network) * 1000 if network else float("nan"),
        network_p99_ms=percentile(network, 99) * 1000,
    )


def summarize(latencies_s: list[float], successes: int, total: int, **extra: Any) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(latencies_s) * 1000 if latencies_s else float("nan"),
        "p99_ms": percentile(latencies_s, 99) * 1000,
        "success": successes / total if total else float("nan"),
        "count": total,
        **extra,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def true_closest(ids: list[int], source: int, target: int, k: int) -> list[int]:
    return sorted((i for i in ids if i != source), key=lambda i: i ^ target)[:k]


# -- p2pdeploy (trio) -------------------------------------------------------------------------


def run_p2pdeploy(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from p2pdeploy.api import KademliaConfig, key_for, open_node

    async def main() -> dict[str, Any]:
        from contextlib import AsyncExitStack

        rng = random.Random(args.seed)
        config = KademliaConfig(k=K, alpha=ALPHA)
        async with AsyncExitStack() as stack:
            started = time.perf_counter()
            first = await stack.enter_async_context(open_node(("127.0.0.1", 0), kademlia=config))
            await first.wait_joined()
            nodes = [first]
            for _ in range(args.nodes - 1):
                node = await stack.enter_async_context(
                    open_node(("127.0.0.1", 0), kademlia=config, bootstrap=[first.address])
                )
                await node.wait_joined()
                nodes.append(node)
            join_s = time.perf_counter() - started
            ids = [node.node_id for node in nodes]

            latencies, successes, exact = [], 0, 0
            for _ in range(args.lookups):
                source, target = rng.choice(nodes), rng.getrandbits(160)
                begun = time.perf_counter()
                found = None
                with trio.move_on_after(OPERATION_BOUND_S):
                    found = await source.lookup(target)
                if found is None:
                    continue
                latencies.append(time.perf_counter() - begun)
                got = [contact.node_id for contact in found]
                successes += len(got) == min(K, args.nodes - 1)
                exact += got == true_closest(ids, source.node_id, target, K)
            lookups = summarize(latencies, successes, args.lookups, exact=exact / max(args.lookups, 1))

            names = [f"bench-value-{i}" for i in range(args.values)]
            for name in names:
                await rng.choice(nodes).put(key_for(name), name.encode())
            timed, successes = [], 0
            for _ in range(args.gets):
                name = rng.choice(names)
                reader = rng.choice(nodes)
                local = reader.overlay.store.get(key_for(name), trio.current_time()) is not None
                begun = time.perf_counter()
                value = None
                with trio.move_on_after(OPERATION_BOUND_S):
                    value = await reader.get(key_for(name))
                if value is None:
                    continue
                timed.append((local, time.perf_counter() - begun))
                successes += value == name.encode()
            gets = summarize_gets(timed, successes, args.gets)
        return {"join_s": join_s, "lookups": lookups, "gets": gets, "peak_rss_mb": peak_rss_mb()}

    return trio.run(main)


# -- the kademlia package (asyncio + rpcudp) --------------------------------------------------


def run_kademlia(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio
    import logging

    from kademlia.crawling import NodeSpiderCrawl
    from kademlia.network import Server
    from kademlia.node import Node
    from kademlia.utils import digest

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)

    async def main() -> dict[str, Any]:
        rng = random.Random(args.seed)
        servers: list[Server] = []
        try:
            started = time.perf_counter()
            for index in range(args.nodes):
                server = Server(ksize=K, alpha=ALPHA, node_id=rng.getrandbits(160).to_bytes(20, "big"))
                await server.listen(0, interface="127.0.0.1")
                servers.append(server)
                if index > 0:
                    await server.bootstrap([("127.0.0.1", servers[0].transport.get_extra_info("sockname")[1])])
            join_s = time.perf_counter() - started
            ids = [server.node.long_id for server in servers]

            latencies, successes, exact = [], 0, 0
            for _ in range(args.lookups):
                server, target = rng.choice(servers), rng.getrandbits(160)
                node = Node(target.to_bytes(20, "big"))
                begun = time.perf_counter()
                nearest = server.protocol.router.find_neighbors(node, server.alpha)
                spider = NodeSpiderCrawl(server.protocol, node, nearest, server.ksize, server.alpha)
                try:
                    found = await asyncio.wait_for(spider.find(), OPERATION_BOUND_S)
                except TimeoutError:
                    continue
                latencies.append(time.perf_counter() - begun)
                got = [peer.long_id for peer in found]
                successes += len(got) == min(K, args.nodes - 1)
                exact += got == true_closest(ids, server.node.long_id, target, K)
            lookups = summarize(latencies, successes, args.lookups, exact=exact / max(args.lookups, 1))

            names = [f"bench-value-{i}" for i in range(args.values)]
            for name in names:
                await rng.choice(servers).set(name, name.encode())
            timed, successes = [], 0
            for _ in range(args.gets):
                name = rng.choice(names)
                server = rng.choice(servers)
                local = server.storage.get(digest(name)) is not None
                begun = time.perf_counter()
                try:
                    value = await asyncio.wait_for(server.get(name), OPERATION_BOUND_S)
                except TimeoutError:
                    continue
                if value is None:
                    continue
                timed.append((local, time.perf_counter() - begun))
                successes += value == name.encode()
            gets = summarize_gets(timed, successes, args.gets)
        finally:
            for server in servers:
                server.stop()
        return {"join_s": join_s, "lookups": lookups, "gets": gets, "peak_rss_mb": peak_rss_mb()}

    return asyncio.run(main())


# -- the simulator ----------------------------------------------------------------------------


def bench_simulator(nodes: int, lookups: int, seed: int) -> dict[str, Any] | None:
    """The simulator's static network of ``nodes`` Kademlia cores (tables built by the oracle,
    see ``p2pdeploy/sim/runners/overlay.py``) answering ``lookups`` lookups of random ids in
    virtual time; returns the summary's figures, the wall time and the peak memory."""
    from pathlib import Path

    from p2pdeploy.sim.scenario import load_scenario, run_scenario

    scenario = load_scenario(
        Path(__file__).resolve().parents[1] / "simulations" / "overlay-static.toml",
        overrides=[f"nodes={nodes}", "overlay.build=oracle", f"overlay.lookups={lookups}", "trace=false",
                   "overlay.settle_s=0", "duration_s=70"],
        seed=seed,
    )
    started = time.perf_counter()
    summary = run_scenario(scenario).summary
    keys = ("lookups", "lookup_success", "exact_k_closest", "hops_median", "hops_p99", "messages_per_lookup",
            "log2_n", "contacts_median", "events", "events_per_second")
    result = {key: summary[key] for key in keys}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# -- the comparison ---------------------------------------------------------------------------


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--side",
        side,
        "--nodes",
        str(args.nodes),
        "--lookups",
        str(args.lookups),
        "--gets",
        str(args.gets),
        "--values",
        str(args.values),
        "--seed",
        str(args.seed),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SIDE_BOUND_S)
    if result.returncode != 0:
        raise SystemExit(f"the {side} side failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(ours: dict[str, Any], theirs: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    rows = [
        (f"join {args.nodes} nodes (s)", ours["join_s"], theirs["join_s"], "{:.2f}"),
        ("lookup median (ms)", ours["lookups"]["median_ms"], theirs["lookups"]["median_ms"], "{:.2f}"),
        ("lookup p99 (ms)", ours["lookups"]["p99_ms"], theirs["lookups"]["p99_ms"], "{:.2f}"),
        (f"lookup success (k={K} contacts)", ours["lookups"]["success"], theirs["lookups"]["success"], "{:.1%}"),
        ("lookup exact (true k closest)", ours["lookups"]["exact"], theirs["lookups"]["exact"], "{:.1%}"),
        ("get median (ms)", ours["gets"]["median_ms"], theirs["gets"]["median_ms"], "{:.2f}"),
        ("get p99 (ms)", ours["gets"]["p99_ms"], theirs["gets"]["p99_ms"], "{:.2f}"),
        ("get success", ours["gets"]["success"], theirs["gets"]["success"], "{:.1%}"),
        ("gets the reader held itself", ours["gets"]["local_share"], theirs["gets"]["local_share"], "{:.1%}"),
        ("get over the network median (ms)", ours["gets"]["network_median_ms"], theirs["gets"]["network_median_ms"], "{:.2f}"),
        ("get over the network p99 (ms)", ours["gets"]["network_p99_ms"], theirs["gets"]["network_p99_ms"], "{:.2f}"),
        ("peak RSS of the side's process (MB)", ours["peak_rss_mb"], theirs["peak_rss_mb"], "{:.0f}"),
    ]
    table = Table(
        title=f"{args.nodes} nodes on 127.0.0.1, {args.lookups} lookups, {args.gets} gets of {args.values} values",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("p2pdeploy", justify="right")
    table.add_column("kademlia", justify="right")
    table.add_column("ratio", justify="right")
    for name, a, b, fmt in rows:
        table.add_row(name, fmt.format(a), fmt.format(b), ratio(a, b))
    console = Console(highlight=False)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--gets", type=int, default=1000)
    parser.add_argument("--values", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sim-nodes", type=int, default=100_000, help="size of the simulator's static network")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator part")
    parser.add_argument("--side", choices=("p2pdeploy", "kademlia"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.side == "p2pdeploy":
        print(json.dumps(run_p2pdeploy(args)))
        return 0
    if args.side == "kademlia":
        print(json.dumps(run_kademlia(args)))
        return 0

    ours = run_side("p2pdeploy", args)
    theirs = run_side("kademlia", args)
    print_table(ours, theirs, args)
    if not args.no_sim:
        simulated = bench_simulator(args.sim_nodes, args.lookups, args.seed)
        if simulated is None:
            print(f"simulator ({args.sim_nodes} nodes): skipped, bench_simulator() is not filled in yet")
        else:
            print(f"simulator ({args.sim_nodes} nodes): {json.dumps(simulated)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
