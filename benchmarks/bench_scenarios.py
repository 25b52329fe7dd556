"""The simulation scenarios' key figures, one table per scenario, and a before/after comparison.

    python benchmarks/bench_scenarios.py [SCENARIO ...] [--only NAME] [--set KEY=VALUE] [--seed N]
                                         [--save FILE.json] [--compare FILE.json]

Each scenario runs as ``p2pdeploy simulate FILE --json`` in a subprocess of its own, one at a
time (the last line of its stdout is the JSON object of summary metrics). A table per scenario
then lists the figures that carry its acceptance (``KEYS`` below: for overlay-static
lookup_success, exact_k_closest, hops_median, hops_p99, messages_per_lookup; for overlay-churn
get_success, lookup_success, exact_k_closest; for persistence-churn blobs_lost and the repair
traffic; ...), then the run's events, events per second, the event loop's seconds (``wall_s``
of the summary), the subprocess's wall seconds (``process wall s``: start-up, build and the
loop) and the trace hash, which is the same exactly when the run took the same events in the
same order (``-`` where the file sets ``trace = false``, as most do to save the hashing;
``--set trace=true`` turns it on everywhere).

Which scenarios: by default ``DEFAULT_SCENARIOS`` from ``simulations/`` plus every
``simulations/*-weibull.toml`` (the heavy-tailed churn twins). A positional ``SCENARIO`` is a
name in ``simulations/`` (``overlay-static``) or a path to a TOML file. ``--only NAME``
(repeatable, or comma-separated) keeps the named ones.

Options:

- ``--set KEY=VALUE`` (repeatable) and ``--seed N`` are passed through to every run, for
  instance ``--set nodes=500`` for a quick look (the figures then differ from the files').
- ``--save FILE.json`` writes ``{name: summary}`` for every scenario run, after each one (a
  crash later keeps what finished). Scenarios already in FILE that were not run this time are
  kept, so one scenario can be run again and its entry replaced. Each summary carries
  ``process_wall_s`` and the ``--set``/``--seed`` it ran with.
- ``--compare FILE.json`` prints ``before | after | ratio`` side by side, where before is the
  summary saved in FILE (for example by an earlier ``--save`` on another commit) and ratio is
  after / before (``same`` or ``differs`` for the trace hash).

A refactor that must not change behaviour keeps every trace hash; one that changes the event
order shows it in the hashes, and the figures say whether the outcome moved. Wall seconds are
for a rough comparison on the same machine only: other load shows in them.

Example, before and after a change::

    git checkout main   && python benchmarks/bench_scenarios.py --save before.json
    git checkout branch && python benchmarks/bench_scenarios.py --compare before.json --save after.json

``--engine`` then runs ``benchmarks/bench_sim_engine.py`` (events per second of the simulator and of
the bare engine against SimPy) in the same run, so the scenario figures and the engine's ratios
come from one sitting of the machine.

Exit status 1 if a scenario failed (its stderr's tail is printed; the others still run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIMULATIONS = ROOT / "simulations"

DEFAULT_SCENARIOS = (
    "overlay-static",
    "overlay-churn",
    "broadcast",
    "broadcast-churn",
    "multicast",
    "prospector",
    "prospector-churn",
    "persistence-churn",
)

#: The figures that carry each scenario's acceptance (see the comments at the top of its file).
KEYS: dict[str, tuple[str, ...]] = {
    "overlay-static": ("lookup_success", "exact_k_closest", "hops_median", "hops_p99", "messages_per_lookup", "log2_n"),
    "overlay-churn": (
        "get_success", "lookup_success", "exact_k_closest", "hops_median", "hops_p99", "messages_per_lookup",
        "gets_unfinished", "lookups_unfinished", "contacts_median", "nodes_up", "departures",
    ),
    "broadcast": (
        "coverage", "coverage_best_effort", "coverage_reliable", "messages_per_node", "acks_per_node_reliable",
        "depth_max", "depth_mean", "log2_n",
    ),
    "broadcast-churn": (
        "coverage_reliable", "coverage_reliable_min", "coverage_reliable_origin_up", "coverage_best_effort",
        "coverage_best_effort_min", "messages_per_node_best_effort", "messages_per_node_reliable",
        "acks_per_node_reliable", "unreached_blocks", "origin_crashed_reliable",
    ),
    "multicast": (
        "all_delivered", "delivery_ratio", "nonmember_forward_fraction", "data_messages_per_message", "depth_max",
        "log2_members", "members_joined",
    ),
    "prospector": (
        "count_error", "sum_error", "convergence_s", "convergence_rounds", "prospect_success",
        "prospect_fewer_found_all", "prospect_only_matching", "prospect_messages_with_n_matches",
        "prospect_messages_fewer_than_n", "log2_n",
    ),
    "prospector-churn": (
        "count_error", "count_error_median", "count_error_p99", "count_within_5pct", "aggregate_ok",
        "aggregate_error_median", "prospect_success_any_match", "prospect_only_matching", "prospect_messages",
    ),
    "persistence-churn": (
        "blobs_lost", "blobs_lost_r2", "blobs_lost_r1", "fetch_success", "repair_bytes_per_node_per_s",
        "repair_bytes_per_node_per_s_all", "keys_under_replicated_longest_s", "keys_without_live_copy_max",
        "nodes_up", "departures",
    ),
}  # fmt: skip

#: Shown for every scenario, after its own keys.
RUN_KEYS = ("events", "events_per_second", "wall_s", "process_wall_s", "trace_hash")

#: For a scenario not in KEYS (and not a variant of one), by its protocol.
PROTOCOL_KEYS: dict[str, str] = {
    "overlay": "overlay-static",
    "broadcast": "broadcast",
    "multicast": "multicast",
    "prospector": "prospector",
    "persistence": "persistence-churn",
}

LABELS = {"wall_s": "loop wall s", "process_wall_s": "process wall s"}


def scenario_paths(names: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` for each name or path, or for the default list plus ``*-weibull.toml``."""
    if not names:
        names = [*DEFAULT_SCENARIOS, *sorted(p.stem for p in SIMULATIONS.glob("*-weibull.toml"))]
    out = []
    for name in names:
        path = Path(name)
        if path.suffix != ".toml":
            path = SIMULATIONS / f"{name}.toml"
        out.append((path.stem, path))
    return out


def keys_for(name: str, summary: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The figures shown for scenario ``name``: its own, a twin's (``x-weibull`` is ``x``'s), or its protocol's."""
    for candidate in (name, name.removesuffix("-weibull")):
        if candidate in KEYS:
            return KEYS[candidate]
    protocol = (summary or {}).get("protocol")
    if protocol in PROTOCOL_KEYS:
        return KEYS[PROTOCOL_KEYS[protocol]]
    return ()


def run(path: Path, overrides: Iterable[str], seed: int | None) -> dict[str, Any]:
    """Run one scenario in a subprocess; its summary, plus ``process_wall_s``. Raises RuntimeError on failure."""
    command = [sys.executable, "-m", "p2pdeploy", "simulate", str(path), "--json"]
    for override in overrides:
        command += ["--set", override]
    if seed is not None:
        command += ["--seed", str(seed)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise RuntimeError(f"{path}: exit status {done.returncode}\n{tail}")
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RuntimeError(f"{path}: the last line of stdout is not JSON: {lines[-1][:200]!r}") from None
    summary["process_wall_s"] = round(wall, 1)
    return summary


def format_value(value: Any) -> str:
    """A figure as a table cell: ``-`` for missing, integers with separators, floats to 6 significant digits."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.6g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3g}"
    if isinstance(value, str):
        return value if len(value) <= 16 else value[:16]
    return json.dumps(value)[:40]


def ratio(before: Any, after: Any) -> str:
    """after / before as a cell: ``same``/``differs`` for strings, ``-`` when it has no meaning."""
    if isinstance(before, str) or isinstance(after, str):
        if not before or not after:
            return "-"
        return "same" if before == after else "differs"
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return "-"
    if isinstance(before, bool) or isinstance(after, bool):
        return "same" if before == after else "differs"
    if before == 0:
        return "1" if after == 0 else "-"
    return f"{after / before:.3f}"


def render(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(row) for row in rows), rule])


def table(name: str, summary: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """One scenario's table: its key figures and the run's cost, with before and ratio columns if given."""
    keys = [*keys_for(name, summary), *RUN_KEYS]
    title = f"{name}: {summary.get('protocol', '?')}, {summary.get('nodes', '?')} nodes, seed {summary.get('seed', '?')}"
    if summary.get("overrides"):
        title += ", --set " + " ".join(summary["overrides"])
    if before is None:
        return render(title, ("figure", "value"), [(LABELS.get(k, k), format_value(summary.get(k))) for k in keys])
    rows = [
        (LABELS.get(k, k), format_value(before.get(k)), format_value(summary.get(k)), ratio(before.get(k), summary.get(k)))
        for k in keys
    ]
    return render(title, ("figure", "before", "after", "ratio"), rows)


def missing_table(name: str, before: dict[str, Any]) -> str:
    """A table for a scenario in the --compare file that failed to run now."""
    keys = [*keys_for(name, before), *RUN_KEYS]
    rows = [(LABELS.get(k, k), format_value(before.get(k)), "failed", "-") for k in keys]
    return render(f"{name}: did not run", ("figure", "before", "after", "ratio"), rows)


def load(path: str | None) -> dict[str, Any]:
    if path is None or not Path(path).exists():
        return {}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a JSON object of {{scenario: summary}}")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help="names in simulations/ or paths (default: the standard list)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="passed to every run")
    parser.add_argument("--save", metavar="FILE.json", help="write the summaries here (others in FILE are kept)")
    parser.add_argument("--compare", metavar="FILE.json", help="show these summaries as 'before' beside this run")
    parser.add_argument("--engine", action="store_true",
                        help="then run bench_sim_engine.py (the event engine against SimPy) in the same run")
    args = parser.parse_args(argv)

    selected = scenario_paths(args.scenarios)
    only = {name.strip() for names in args.only for name in names.split(",") if name.strip()}
    if only:
        unknown = only - {name for name, _ in selected}
        if unknown:
            parser.error(f"--only: not in the list: {', '.join(sorted(unknown))}")
        selected = [(name, path) for name, path in selected if name in only]
    for name, path in selected:
        if not path.is_file():
            parser.error(f"{name}: no scenario file {path}")
    if args.compare and not Path(args.compare).exists():
        parser.error(f"--compare: no file {args.compare}")
    before = load(args.compare)
    saved = load(args.save)

    failed = 0
    total_started = time.perf_counter()
    for name, path in selected:
        print(f"# {name} ({path.name}) ...", file=sys.stderr, flush=True)
        try:
            summary = run(path, args.overrides, args.seed)
        except RuntimeError as exc:
            failed += 1
            print(f"FAILED {exc}", file=sys.stderr, flush=True)
            if name in before:
                print(missing_table(name, before[name]) + "\n", flush=True)
            continue
        if args.overrides:
            summary["overrides"] = list(args.overrides)
        if args.save:
            saved[name] = summary
            Path(args.save).write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        print(table(name, summary, before.get(name) if args.compare else None) + "\n", flush=True)
    print(f"{len(selected) - failed} of {len(selected)} scenarios ran, {time.perf_counter() - total_started:.0f} s in all")
    if args.engine:
        print("# the event engine against SimPy (bench_sim_engine.py) ...", file=sys.stderr, flush=True)
        engine = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sim_engine.py")], cwd=ROOT)
        failed += engine.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
