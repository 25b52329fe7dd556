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

With ``--kill FRACTION`` both networks then lose that share of their nodes (the same indices on
both sides): ours are stopped (their sockets close, they answer nothing), the package's servers
are stopped (transport closed). p2pdeploy's side waits until every live node's failure detector
declared dead each killed node its routing table held (polling, bounded by ``KILL_VERDICT_BOUND_S``)
and reports the time to a verdict (median over those pairs, and until the last); the package's
side waits the same wall time. Then ``--kill-lookups`` lookups and ``--kill-gets`` gets of the
values stored before the kill are measured from live nodes: *exact* is now the true k closest
LIVE nodes (XOR among the live ids, the asker excluded), success min(k, live - 1) contacts.

Then one table with a ratio column (p2pdeploy / kademlia; below 1 means p2pdeploy is faster),
and with ``--kill`` a second one for after the kill, with the no-kill figures beside.
The simulator's 10^5-node static network is :func:`bench_simulator`: it builds the network,
answers the lookups in virtual time and prints its figures and peak memory.

    python benchmarks/bench_overlay.py [--nodes 32] [--lookups 1000] [--gets 1000] [--values 100]
        [--kill 0.333 [--kill-lookups 100] [--kill-gets 100]]
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
#: How long p2pdeploy's side waits at most for its detectors' verdicts on the killed nodes.
KILL_VERDICT_BOUND_S = 120.0
#: How often it looks.
VERDICT_POLL_S = 0.02


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
    held = [latency for local, latency in timed if local]
    return summarize(
        [latency for _, latency in timed],
        successes,
        total,
        local_share=(len(timed) - len(network)) / total if total else float("nan"),
        local_median_ms=statistics.median(held) * 1000 if held else float("nan"),
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


def kill_plan(args: argparse.Namespace) -> list[int]:
    """The indices of the nodes ``--kill`` stops (the same on both sides); never the only survivor."""
    count = min(round(args.kill * args.nodes), args.nodes - 2) if args.kill else 0
    return sorted(random.Random(args.seed + 1).sample(range(args.nodes), max(count, 0)))


def measure_lookups(results: list[tuple[float | None, list[int], int, int, int | None]], ids: list[int],
                    total: int) -> dict[str, Any]:
    """Lookups as ``(latency or None, got, asker, target, dead asked)``; exact against ``ids`` (the live ones)."""
    latencies, successes, exact, waited = [], 0, 0, 0
    for latency, got, asker, target, failures in results:
        if latency is None:
            continue
        latencies.append(latency)
        successes += len(got) == min(K, len(ids) - 1)
        exact += got == true_closest(ids, asker, target, K)
        waited += bool(failures)
    return summarize(latencies, successes, total, exact=exact / max(total, 1),
                     waited_on_dead=waited / max(total, 1) if total else float("nan"))


# -- p2pdeploy (trio) -------------------------------------------------------------------------


def run_p2pdeploy(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from p2pdeploy.api import KademliaConfig, key_for, open_node
    from p2pdeploy.overlay.kademlia import LookupFinished

    config = KademliaConfig(k=K, alpha=ALPHA)

    async def host(bootstrap: list[Any], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """One node, in a task of its own so that cancelling its scope stops it alone."""
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with open_node(("127.0.0.1", 0), kademlia=config, bootstrap=bootstrap, hand_off=False) as node:
                    task_status.started((node, scope, stopped))
                    await trio.sleep_forever()
        finally:
            stopped.set()

    async def lookups(rng: random.Random, nodes: list[Any], count: int) -> dict[str, Any]:
        ids = [node.node_id for node in nodes]
        results = []
        for _ in range(count):
            source, target = rng.choice(nodes), rng.getrandbits(160)
            begun = time.perf_counter()
            event: LookupFinished | None = None
            with trio.move_on_after(OPERATION_BOUND_S):
                event = await source.query(lambda overlay, now, target=target: overlay.lookup(target, now))
            if event is None:
                results.append((None, [], source.node_id, target, None))
                continue
            latency = time.perf_counter() - begun
            results.append((latency, [c.node_id for c in event.closest], source.node_id, target, event.failures))
        return measure_lookups(results, ids, count)

    async def gets(rng: random.Random, nodes: list[Any], names: list[str], count: int) -> dict[str, Any]:
        timed, successes = [], 0
        for _ in range(count):
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
        return summarize_gets(timed, successes, count)

    async def await_verdicts(live: list[Any], killed_ids: set[int], killed_at: float) -> dict[str, Any]:
        """Poll until every live node's detector holds dead each killed node its table held when
        it was killed (or the contact left the table); the times to those verdicts."""
        pending = {(node, node_id) for node in live for node_id in killed_ids
                   if node.overlay.table.get(node_id) is not None}
        pairs = len(pending)
        times: list[float] = []
        with trio.move_on_after(KILL_VERDICT_BOUND_S):
            while pending:
                for node, node_id in list(pending):
                    detector = node.overlay.detector
                    if (detector is not None and detector.dead(node_id)) or node.overlay.table.get(node_id) is None:
                        pending.discard((node, node_id))
                        times.append(time.perf_counter() - killed_at)
                if pending:
                    await trio.sleep(VERDICT_POLL_S)
        waited = time.perf_counter() - killed_at
        return {"pairs": pairs, "missing": len(pending), "wait_s": waited,
                "median_s": statistics.median(times) if times else float("nan"),
                "last_s": max(times) if times else float("nan")}

    async def main() -> dict[str, Any]:
        rng = random.Random(args.seed)
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            first, first_scope, first_stopped = await nursery.start(host, [])
            await first.wait_joined()
            hosted = [(first, first_scope, first_stopped)]
            for _ in range(args.nodes - 1):
                hosted.append(await nursery.start(host, [first.address]))
                await hosted[-1][0].wait_joined()
            join_s = time.perf_counter() - started
            nodes = [node for node, _, _ in hosted]

            result: dict[str, Any] = {"join_s": join_s, "lookups": await lookups(rng, nodes, args.lookups)}
            names = [f"bench-value-{i}" for i in range(args.values)]
            for name in names:
                await rng.choice(nodes).put(key_for(name), name.encode())
            result["gets"] = await gets(rng, nodes, names, args.gets)

            doomed = kill_plan(args)
            if doomed:
                for index in doomed:
                    hosted[index][1].cancel()
                for index in doomed:
                    await hosted[index][2].wait()
                killed_at = time.perf_counter()
                live = [node for index, node in enumerate(nodes) if index not in doomed]
                verdicts = await await_verdicts(live, {nodes[index].node_id for index in doomed}, killed_at)
                kill_rng = random.Random(args.seed + 2)
                result["killed"] = {
                    "count": len(doomed),
                    "verdicts": verdicts,
                    "lookups": await lookups(kill_rng, live, args.kill_lookups),
                    "gets": await gets(kill_rng, live, names, args.kill_gets),
                }
            nursery.cancel_scope.cancel()
        result["peak_rss_mb"] = peak_rss_mb()
        return result

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

    async def lookups(rng: random.Random, servers: list[Server], count: int) -> dict[str, Any]:
        ids = [server.node.long_id for server in servers]
        results = []
        for _ in range(count):
            server, target = rng.choice(servers), rng.getrandbits(160)
            node = Node(target.to_bytes(20, "big"))
            begun = time.perf_counter()
            nearest = server.protocol.router.find_neighbors(node, server.alpha)
            spider = NodeSpiderCrawl(server.protocol, node, nearest, server.ksize, server.alpha)
            try:
                found = await asyncio.wait_for(spider.find(), OPERATION_BOUND_S)
            except TimeoutError:
                results.append((None, [], server.node.long_id, target, None))
                continue
            latency = time.perf_counter() - begun
            results.append((latency, [peer.long_id for peer in found], server.node.long_id, target, None))
        summary = measure_lookups(results, ids, count)
        summary["waited_on_dead"] = float("nan")  # the package does not say
        return summary

    async def gets(rng: random.Random, servers: list[Server], names: list[str], count: int) -> dict[str, Any]:
        timed, successes = [], 0
        for _ in range(count):
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
        return summarize_gets(timed, successes, count)

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

            result: dict[str, Any] = {"join_s": join_s, "lookups": await lookups(rng, servers, args.lookups)}
            names = [f"bench-value-{i}" for i in range(args.values)]
            for name in names:
                await rng.choice(servers).set(name, name.encode())
            result["gets"] = await gets(rng, servers, names, args.gets)

            doomed = kill_plan(args)
            if doomed:
                for index in doomed:
                    servers[index].stop()
                await asyncio.sleep(args.kill_wait)  # the wall time p2pdeploy's detectors took
                live = [server for index, server in enumerate(servers) if index not in doomed]
                kill_rng = random.Random(args.seed + 2)
                result["killed"] = {
                    "count": len(doomed),
                    "verdicts": {"wait_s": args.kill_wait},
                    "lookups": await lookups(kill_rng, live, args.kill_lookups),
                    "gets": await gets(kill_rng, live, names, args.kill_gets),
                }
        finally:
            for server in servers:
                server.stop()
        result["peak_rss_mb"] = peak_rss_mb()
        return result

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


def run_side(side: str, args: argparse.Namespace, kill_wait_s: float = 0.0) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--side", side]
    for option in ("nodes", "lookups", "gets", "values", "seed", "kill", "kill_lookups", "kill_gets"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--kill-wait", str(kill_wait_s)]
    bound = SIDE_BOUND_S + (args.kill_lookups + args.kill_gets) * OPERATION_BOUND_S / 4 if args.kill else SIDE_BOUND_S
    result = subprocess.run(command, capture_output=True, text=True, timeout=bound)
    if result.returncode != 0:
        raise SystemExit(f"the {side} side failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


Row = tuple[str, Any, Any, str]


def phase_rows(ours: dict[str, Any], theirs: dict[str, Any]) -> list[Row]:
    """The lookup and get rows of one phase (before or after the kill)."""
    ol, tl, og, tg = ours["lookups"], theirs["lookups"], ours["gets"], theirs["gets"]
    return [
        ("lookup median (ms)", ol["median_ms"], tl["median_ms"], "{:.2f}"),
        ("lookup p99 (ms)", ol["p99_ms"], tl["p99_ms"], "{:.2f}"),
        (f"lookup success (k={K} contacts)", ol["success"], tl["success"], "{:.1%}"),
        ("lookup exact (true k closest)", ol["exact"], tl["exact"], "{:.1%}"),
        ("get median (ms)", og["median_ms"], tg["median_ms"], "{:.3f}"),
        ("get p99 (ms)", og["p99_ms"], tg["p99_ms"], "{:.2f}"),
        ("get success", og["success"], tg["success"], "{:.1%}"),
        ("gets the reader held itself", og["local_share"], tg["local_share"], "{:.1%}"),
        ("get the reader held median (ms)", og["local_median_ms"], tg["local_median_ms"], "{:.3f}"),
        ("get over the network median (ms)", og["network_median_ms"], tg["network_median_ms"], "{:.2f}"),
        ("get over the network p99 (ms)", og["network_p99_ms"], tg["network_p99_ms"], "{:.2f}"),
    ]


def _number(fmt: str, value: Any) -> str:
    return "-" if value is None or value != value else fmt.format(value)  # NaN: not measured


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or a != a or b != b or not b:
        return "-"
    return f"{a / b:.2f}"


def print_table(ours: dict[str, Any], theirs: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [
        (f"join {args.nodes} nodes (s)", ours["join_s"], theirs["join_s"], "{:.2f}"),
        *phase_rows(ours, theirs),
        ("peak RSS of the side's process (MB)", ours["peak_rss_mb"], theirs["peak_rss_mb"], "{:.0f}"),
    ]
    table = Table(
        title=f"{args.nodes} nodes on 127.0.0.1, {args.lookups} lookups, {args.gets} gets of {args.values} values",
        title_justify="left",
    )
    for column in ("metric", "p2pdeploy", "kademlia", "ratio"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, a, b, fmt in rows:
        table.add_row(name, _number(fmt, a), _number(fmt, b), _ratio(a, b))
    console = Console(highlight=False)
    console.print(table)
    if "killed" not in ours:
        return

    killed_ours, killed_theirs = ours["killed"], theirs["killed"]
    verdicts = killed_ours["verdicts"]
    after = phase_rows(killed_ours, killed_theirs)
    before = {name: (a, b) for name, a, b, _ in phase_rows(ours, theirs)}
    after.insert(4, ("lookups that waited on a dead node", killed_ours["lookups"]["waited_on_dead"],
                     killed_theirs["lookups"]["waited_on_dead"], "{:.1%}"))
    table = Table(
        title=(f"after killing {killed_ours['count']} of {args.nodes} nodes (--kill {args.kill:g}) and waiting "
               f"{verdicts['wait_s']:.1f} s: {args.kill_lookups} lookups, {args.kill_gets} gets from live nodes; "
               "exact = the true k closest live nodes"),
        title_justify="left",
    )
    for column in ("metric", "p2pdeploy", "no kill", "kademlia", "no kill", "ratio", "p2pdeploy / no kill"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, a, b, fmt in after:
        a0, b0 = before.get(name, (None, None))
        table.add_row(name, _number(fmt, a), _number(fmt, a0), _number(fmt, b), _number(fmt, b0), _ratio(a, b),
                      _ratio(a, a0))
    console.print(table)
    console.print(
        f"p2pdeploy's detectors: {verdicts['pairs']} (live node, killed node in its table) pairs; "
        f"median time to a verdict {verdicts['median_s']:.2f} s, the last after {verdicts['last_s']:.2f} s"
        + (f", {verdicts['missing']} without a verdict after {KILL_VERDICT_BOUND_S:g} s" if verdicts["missing"] else "")
        + "; the kademlia side waited the same wall time"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--gets", type=int, default=1000)
    parser.add_argument("--values", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill", type=float, default=0.0, metavar="FRACTION",
                        help="after the no-kill figures, kill this share of each network and measure again")
    parser.add_argument("--kill-lookups", type=int, default=100, help="lookups after the kill")
    parser.add_argument("--kill-gets", type=int, default=100, help="gets after the kill")
    parser.add_argument("--sim-nodes", type=int, default=100_000, help="size of the simulator's static network")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator part")
    parser.add_argument("--side", choices=("p2pdeploy", "kademlia"), help=argparse.SUPPRESS)
    parser.add_argument("--kill-wait", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if not 0 <= args.kill < 1:
        parser.error("--kill is a fraction in [0, 1)")
    if args.side == "p2pdeploy":
        print(json.dumps(run_p2pdeploy(args)))
        return 0
    if args.side == "kademlia":
        print(json.dumps(run_kademlia(args)))
        return 0

    ours = run_side("p2pdeploy", args)
    kill_wait_s = ours["killed"]["verdicts"]["wait_s"] if "killed" in ours else 0.0
    theirs = run_side("kademlia", args, kill_wait_s)
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
