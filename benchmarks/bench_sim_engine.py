"""Events per second of the simulator on the ping workload, against the same workload in SimPy.

    python benchmarks/bench_sim_engine.py [--sizes 1000,10000,100000] [--events 900000] [--no-trace]

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
not the set-up of the nodes.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

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


def run_simulator(nodes: int, duration_s: float, seed: int, trace: bool) -> tuple[int, float, int]:
    scenario = parse_scenario(
        {
            "protocol": "ping",
            "nodes": nodes,
            "duration_s": duration_s,
            "seed": seed,
            "trace": trace,
            "network": {"latency_model": "euclidean", "base_latency_ms": 10.0, "latency_scale_ms": 100.0},
            "metrics": {"per_node": False, "sample_interval_s": duration_s},
            "ping": {"interval_s": INTERVAL_S, "identities": "hash"},
        },
        source="bench",
    )
    summary = run_scenario(scenario).summary
    return summary["events"], summary["wall_s"], summary["pings_sent"]


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
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
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
    console.print(f"total {time.perf_counter() - total_started:.0f} s")


if __name__ == "__main__":
    main()
