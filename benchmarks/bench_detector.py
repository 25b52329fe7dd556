"""The failure detector on real ``p2pdeploy join`` processes, beside the simulator's figures.

Loopback defaults (period 0.5 s, probe timeout 0.2 s, suspicion 3-9 s). Three trials:

- **kill**: ``--nodes`` processes joined through the first, every node watching every other;
  ``--kills`` times, SIGKILL one node and time each live watcher's verdict (kill -> the
  watcher's own ``since``, read through its control socket); median and p99 over all verdicts.
- **pause**: SIGSTOP one node for 2 s, SIGCONT; how many nodes declared it dead (should be 0).
- **loss** (root, a network namespace of its own): ``--loss-nodes`` processes form a community,
  then their loopback drops ``--loss`` of the packets for ``--loss-s`` seconds; how many live
  nodes were declared dead (should be 0). Skipped, saying why, where namespaces or packet loss
  cannot be had.

Then the simulator's figures for the same detector (``p2pdeploy simulate
simulations/detector.toml --json``: 50 nodes, 10 % loss, kills and 2 s pauses).

    python benchmarks/bench_detector.py [--nodes 8] [--kills 3] [--loss-nodes 50] [--loss-s 600]
                                        [--loss 0.1] [--skip-loss] [--skip-sim]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pdeploy.overlay.swim import DetectorConfig
from p2pdeploy.runtime.detector_trials import (
    NamespaceUnavailable,
    network_namespace,
    pause_and_watch,
    start_community,
    statuses,
    time_to_verdicts,
    wait_all_watching,
    watch_for_false_deaths,
)
from p2pdeploy.runtime.localnet import open_local_processes

sys.path.insert(0, str(Path(__file__).parent))
from bench_overlay import percentile  # noqa: E402 - the benchmarks' one nearest-rank percentile

EXTRA_ARGS = ["--kademlia", "watch_sync_interval_s=1"]
WATCH_BOUND_S = 300.0
VERDICT_BOUND_S = 60.0
PAUSE_S = 2.0


async def kill_and_pause(nodes_count: int, kills: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-detector-") as root:
        async with open_local_processes() as local:
            nodes = await start_community(local, Path(root), nodes_count, extra_args=EXTRA_ARGS)
            await wait_all_watching(nodes, nodes_count - 1, WATCH_BOUND_S)
            config = DetectorConfig()
            paused = nodes[-1]
            others = nodes[:-1]
            outcome = await pause_and_watch(
                paused, others, PAUSE_S, config.suspicion_max_s + 2 * config.protocol_period_s
            )
            live = list(nodes)
            times: list[float] = []
            missing = 0
            for round_ in range(kills):
                victim = live[1 + round_ % (len(live) - 1)]  # never the seed: it is no different, but stays
                live.remove(victim)
                verdicts = await time_to_verdicts(victim, live, VERDICT_BOUND_S)
                times.extend(verdicts.values())
                missing += len(live) - len(verdicts)
            return {
                "nodes": nodes_count,
                "kills": kills,
                "verdicts": len(times),
                "missing_verdicts": missing,
                "median_s": statistics.median(times) if times else float("nan"),
                "p99_s": percentile(times, 99),
                "max_s": max(times, default=float("nan")),
                "pause_suspected_by": len(outcome.suspected_by),
                "pause_declared_dead_by": len(outcome.declared_dead_by | outcome.counted_deaths),
            }


async def loss_trial(nodes_count: int, loss: float, duration_s: float) -> dict[str, Any]:
    try:
        with network_namespace() as namespace, tempfile.TemporaryDirectory(prefix="bench-detector-") as root:
            async with open_local_processes() as local:
                nodes = await start_community(
                    local, Path(root), nodes_count, extra_args=EXTRA_ARGS, command_prefix=namespace.command_prefix
                )
                await wait_all_watching(nodes, 1, WATCH_BOUND_S)
                watched = [s.detector.watched for s in (await statuses(nodes)).values() if s and s.detector]
                method = namespace.add_loss(loss)
                started = time.monotonic()
                wrongly = await watch_for_false_deaths(nodes, duration_s)
                final = await statuses(nodes)
                return {
                    "nodes": nodes_count,
                    "loss": loss,
                    "method": method,
                    "seconds": round(time.monotonic() - started, 1),
                    "watched_min": min(watched, default=0),
                    "watched_median": statistics.median(watched) if watched else 0,
                    "live_declared_dead": sum(len(ids) for ids in wrongly.values()),
                    "verdicts_counted": sum(
                        s.detector.counters.get("peers_declared_dead", 0) for s in final.values() if s and s.detector
                    ),
                    "recovered_counted": sum(
                        s.detector.counters.get("peers_recovered", 0) for s in final.values() if s and s.detector
                    ),
                    "max_health": max((s.detector.health for s in final.values() if s and s.detector), default=0),
                }
    except NamespaceUnavailable as exc:
        return {"skipped": str(exc)}


def simulator_figures() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "p2pdeploy", "simulate", "simulations/detector.toml", "--json"],
        capture_output=True, text=True, timeout=1800, check=False, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr or result.stdout)[-500:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--loss-nodes", type=int, default=50)
    parser.add_argument("--loss-s", type=float, default=600.0)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    args = parser.parse_args()

    real = trio.run(kill_and_pause, args.nodes, args.kills)
    print(f"{'':34} {'real processes':>16} {'simulator':>12}")
    sim = {} if args.skip_sim else simulator_figures()
    rows = [
        ("time to verdict, median (s)", real["median_s"], sim.get("detection_median_s")),
        ("time to verdict, p99 (s)", real["p99_s"], sim.get("detection_p99_s")),
        ("time to verdict, max (s)", real["max_s"], None),
        ("verdicts (missing)", f"{real['verdicts']} ({real['missing_verdicts']})", None),
        ("2 s pause: suspected by", real["pause_suspected_by"], None),
        ("2 s pause: declared dead by", real["pause_declared_dead_by"], None),
        ("false deaths (simulator)", None, sim.get("false_deaths")),
    ]
    for name, ours, theirs in rows:
        print(f"{name:34} {_cell(ours):>16} {_cell(theirs):>12}")
    print(f"real: {args.nodes} nodes on loopback, {args.kills} kills; simulator: simulations/detector.toml "
          f"{'(skipped)' if args.skip_sim else json.dumps(sim, sort_keys=True)}")
    if not args.skip_loss:
        lossy = trio.run(loss_trial, args.loss_nodes, args.loss, args.loss_s)
        print(f"loss trial: {json.dumps(lossy, sort_keys=True)}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


if __name__ == "__main__":
    main()
