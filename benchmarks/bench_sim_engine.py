"""Events per second of the simulator on the ping workload, against the same workload in SimPy.

    python benchmarks/bench_sim_engine.py [--sizes 1000,10000,100000] [--events 600000] [--no-trace]
        [--encoding-sizes 1000,5000] [--encoding-events 150000] [--encoding-lookups 1000] [--repeat 3]

The workload: every node pings a random other node every second; the ping arrives after the
pair's modelled latency (euclidean coordinates, 10 ms + distance x 100 ms) and the pong comes
back the same way. Three ways to run it, on the same number of nodes and simulated seconds:

- ``simulator``: the real thing, a ``protocol = "ping"`` scenario: one
  ``Stack([PingProtocol])`` sans-I/O core per node with its own random stream, RTT estimation
  and timeout timers, the host driver loop, the network model and the trace hash;
- ``engine``: the bare workload as plain callbacks on :class:`p2pdeploy.sim.engine.Engine`
  (no protocol core, no network object), which isolates the event heap itself;
- ``simpy``: the bare workload written idiomatically in SimPy 4 (a generator process per node,
  deliveries as ``Timeout`` events with callbacks), the baseline.

Each run gets a simulated duration so that it processes about ``--events`` events (about three
per ping: the timer, the ping's delivery, the pong's); the table prints it. ``ratio`` columns
are events/s divided by SimPy's events/s. Wall time is measured around the event loop only,
not the set-up of the nodes. The ``simulator`` column runs as scenarios do by default, every
message encoded to wire bytes and decoded at its receiver (``network.encode = true``).

A second table prices the wire format: the ``simulator`` workload, and an overlay workload
(``protocol = "overlay"``, prefilled routing tables, then ``--encoding-lookups`` random lookups,
whose replies carry k contacts and cost far more to encode than a ping), each run with
``network.encode`` on and off on ``--encoding-sizes`` nodes, alternately, ``--repeat`` times; the
best wall time of each side counts. Its ``cost`` column is wall time on over wall time off, and
``messages`` counts the messages sent (each encoded once and decoded once when on).
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simpy  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from p2pdeploy.sim.engine import Engine  # noqa: E402
from p2pdeploy.sim.scenario import parse_scenario, run_scenario  # noqa: E402

INTERVAL_S = 1.0
BASE_S = 0.010
SCALE_S = 0.100


def coordinates(nodes: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(nodes)], [rng.random() for _ in range(nodes)]


def run_simulator(nodes: int, duration_s: float, seed: int, trace: bool, encode: bool = True) -> tuple[int, float, int]:
    summary = ping_summary(nodes, duration_s, seed, trace, encode)
    return summary["events"], summary["wall_s"], summary["pings_sent"]


def run_ping_messages(nodes: int, duration_s: float, seed: int, trace: bool, encode: bool) -> tuple[int, float, int]:
    summary = ping_summary(nodes, duration_s, seed, trace, encode)
    return summary["events"], summary["wall_s"], summary["messages_sent"]


def ping_summary(nodes: int, duration_s: float, seed: int, trace: bool, encode: bool) -> dict[str, Any]:
    scenario = parse_scenario(
        {
            "protocol": "ping",
            "nodes": nodes,
            "duration_s": duration_s,
            "seed": seed,
            "trace": trace,
            "network": {
                "latency_model": "euclidean",
                "base_latency_ms": 10.0,
                "latency_scale_ms": 100.0,
                "encode": encode,
            },
            "metrics": {"per_node": False, "sample_interval_s": duration_s},
            "ping": {"interval_s": INTERVAL_S, "identities": "hash"},
        },
        source="bench",
    )
    return run_scenario(scenario).summary


def run_overlay(nodes: int, lookups: int, seed: int, trace: bool, encode: bool) -> tuple[int, float, int]:
    """Prefilled routing tables (``build = "oracle"``), then ``lookups`` random lookups over 30 s."""
    duration_s = 60.0  # the lookups start at 15 s (settle 5 s, store window 10 s) and spread over 30 s
    scenario = parse_scenario(
        {
            "protocol": "overlay",
            "nodes": nodes,
            "duration_s": duration_s,
            "seed": seed,
            "trace": trace,
            "network": {"latency_model": "euclidean", "jitter_ms": 2.0, "encode": encode},
            "metrics": {"per_node": False, "sample_interval_s": duration_s},
            "overlay": {
                "build": "oracle",
                "settle_s": 5.0,
                "values": 0,
                "workload_delay_s": 0.0,
                "lookups": lookups,
                "workload_window_s": 30.0,
            },
        },
        source="bench",
    )
    summary = run_scenario(scenario).summary
    return summary["events"], summary["wall_s"], summary["messages_sent"]


def encoding_table(
    sizes: list[int], events: int, lookups: int, repeat: int, seed: int, trace: bool, console: Console
) -> Table:
    """Events per second and wall time of the same runs with messages encoded and not.

    On and off alternate ``repeat`` times and the best wall time of each counts, so a burst of
    load from another process on a shared machine hits both sides alike.
    """
    table = Table(
        title=f"the cost of the wire format: network.encode on vs off "
        f"(trace hash {'on' if trace else 'off'}; best of {repeat})"
    )
    for column in ("workload", "nodes", "events", "messages", "ev/s on", "ev/s off", "wall s on", "wall s off", "cost"):
        table.add_column(column, justify="right")
    for nodes in sizes:
        duration_s = max(2.0, round(events / (3 * nodes / INTERVAL_S), 1))
        workloads: list[tuple[str, Callable[[bool], tuple[int, float, int]]]] = [
            ("ping", functools.partial(run_ping_messages, nodes, duration_s, seed, trace)),
            ("overlay lookups", functools.partial(run_overlay, nodes, lookups, seed, trace)),
        ]
        for name, run in workloads:
            console.print(f"[dim]{name}, {nodes} nodes, encode on and off, {repeat} times ...[/dim]", highlight=False)
            on_walls, off_walls = [], []
            for _ in range(repeat):
                on_events, on_wall, messages = run(True)
                off_events, off_wall, _ = run(False)
                if on_events != off_events:
                    raise AssertionError(f"{name}: encoding changed the run ({on_events} vs {off_events} events)")
                on_walls.append(on_wall)
                off_walls.append(off_wall)
            on_wall, off_wall = min(on_walls), min(off_walls)
            table.add_row(
                name,
                f"{nodes:,}",
                f"{on_events:,}",
                f"{messages:,}",
                f"{on_events / on_wall:,.0f}",
                f"{off_events / off_wall:,.0f}",
                f"{on_wall:.2f}",
                f"{off_wall:.2f}",
                f"{on_wall / off_wall:.2f}x",
            )
    return table


def run_engine(nodes: int, duration_s: float, seed: int, trace: bool) -> tuple[int, float, int]:
    engine = Engine(trace=trace)
    rng = random.Random(seed)
    xs, ys = coordinates(nodes, seed)
    hypot = math.hypot
    schedule = engine.schedule
    rtts: list[float] = []
    sent = 0

    def latency(a: int, b: int) -> float:
        return BASE_S + SCALE_S * hypot(xs[a] - xs[b], ys[a] - ys[b])

    def pong_arrived(src: int, sent_at: float) -> None:
        rtts.append(engine.now - sent_at)

    def ping_arrived(src: int, dst: int, sent_at: float) -> None:
        schedule(engine.now + latency(dst, src), pong_arrived, src, sent_at)

    def round_due(node: int) -> None:
        nonlocal sent
        now = engine.now
        target = rng.randrange(nodes - 1)
        if target >= node:
            target += 1
        sent += 1
        schedule(now + latency(node, target), ping_arrived, node, target, now)
        schedule(now + INTERVAL_S, round_due, node)

    for node in range(nodes):
        schedule(rng.uniform(0, INTERVAL_S), round_due, node)
    started = time.perf_counter()
    engine.run(until=duration_s)
    return engine.events, time.perf_counter() - started, sent


def run_simpy(nodes: int, duration_s: float, seed: int) -> tuple[int, float, int]:
    env = simpy.Environment()
    rng = random.Random(seed)
    xs, ys = coordinates(nodes, seed)
    hypot = math.hypot
    counts = {"events": 0, "sent": 0}
    rtts: list[float] = []

    def latency(a: int, b: int) -> float:
        return BASE_S + SCALE_S * hypot(xs[a] - xs[b], ys[a] - ys[b])

    def pong_arrived(event: simpy.Event) -> None:
        counts["events"] += 1
        rtts.append(env.now - event.value)

    def ping_arrived(event: simpy.Event) -> None:
        counts["events"] += 1
        src, dst, sent_at = event.value
        env.timeout(latency(dst, src), sent_at).callbacks.append(pong_arrived)

    def node_process(node: int):  # type: ignore[no-untyped-def]
        yield env.timeout(rng.uniform(0, INTERVAL_S))
        while True:
            counts["events"] += 1
            target = rng.randrange(nodes - 1)
            if target >= node:
                target += 1
            counts["sent"] += 1
            env.timeout(latency(node, target), (node, target, env.now)).callbacks.append(ping_arrived)
            yield env.timeout(INTERVAL_S)

    for node in range(nodes):
        env.process(node_process(node))
    started = time.perf_counter()
    env.run(until=duration_s)
    return counts["events"], time.perf_counter() - started, counts["sent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated node counts")
    parser.add_argument("--events", type=int, default=600_000, help="about this many events per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-trace", action="store_true", help="run without the event-trace hash")
    parser.add_argument(
        "--encoding-sizes", default="1000,5000", help="node counts for the encode on/off table ('' skips it)"
    )
    parser.add_argument("--encoding-events", type=int, default=150_000, help="about this many ping events per run")
    parser.add_argument("--encoding-lookups", type=int, default=1000, help="lookups of the overlay workload")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side of the encoding table (best counts)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    encoding_sizes = [int(size) for size in args.encoding_sizes.split(",") if size.strip()]
    trace = not args.no_trace
    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(
        title=f"ping workload, events per second (trace hash {'on' if trace else 'off'}; "
        f"Python {sys.version.split()[0]}, SimPy {simpy.__version__})"
    )
    for column in (
        "nodes",
        "sim. s",
        "pings",
        "events",
        "simulator ev/s",
        "engine ev/s",
        "SimPy ev/s",
        "simulator/SimPy",
        "engine/SimPy",
    ):
        table.add_column(column, justify="right")
    total_started = time.perf_counter()
    for nodes in sizes:
        # About three events per ping and one ping per node per interval.
        duration_s = max(2.0, round(args.events / (3 * nodes / INTERVAL_S), 1))
        console.print(f"[dim]{nodes} nodes, {duration_s:g} simulated seconds ...[/dim]", highlight=False)
        sim_events, sim_wall, pings = run_simulator(nodes, duration_s, args.seed, trace)
        engine_events, engine_wall, _ = run_engine(nodes, duration_s, args.seed, trace)
        simpy_events, simpy_wall, _ = run_simpy(nodes, duration_s, args.seed)
        sim_rate = sim_events / sim_wall
        engine_rate = engine_events / engine_wall
        simpy_rate = simpy_events / simpy_wall
        table.add_row(
            f"{nodes:,}",
            f"{duration_s:g}",
            f"{pings:,}",
            f"{sim_events:,}",
            f"{sim_rate:,.0f}",
            f"{engine_rate:,.0f}",
            f"{simpy_rate:,.0f}",
            f"{sim_rate / simpy_rate:.2f}",
            f"{engine_rate / simpy_rate:.2f}",
        )
    console.print(table)
    if encoding_sizes:
        costs = encoding_table(
            encoding_sizes, args.encoding_events, args.encoding_lookups, args.repeat, args.seed, trace, console
        )
        console.print(costs)
    console.print(f"total {time.perf_counter() - total_started:.0f} s")


if __name__ == "__main__":
    main()
