"""Scenario files: load a TOML scenario, apply overrides, run it, report and write results.

``p2pdeploy simulate FILE [--seed N] [--set key=value ...] [--out DIR] [--json]`` calls
:func:`run_cli`. The steps, each usable alone:

- :func:`load_scenario` reads the file (``tomllib``), applies ``--set`` overrides
  (:func:`apply_override`: dotted keys, the value parsed as TOML and kept as a string when it is
  not TOML, so ``--set churn.model=sessions`` and ``--set nodes=200`` both work) and ``--seed``,
  picks the runner named by ``protocol`` and validates every key against the base schema
  (:mod:`p2pdeploy.sim.schema`) plus the runner's tables. Errors are :class:`ScenarioError`
  and name the file and key.
- :func:`run_scenario` builds the simulation, starts the runner and churn, runs the event loop
  in chunks of ``metrics.sample_interval_s`` (sampling metrics between chunks, outside the
  engine, so sampling never changes the event trace) and returns a :class:`RunResult`.
- :func:`write_results` writes ``summary.json``, the resolved scenario (``scenario.toml`` and
  ``scenario.json``), the metric time series (``timeseries.csv``/``.jsonl``, per node
  ``nodes.csv``/``.jsonl``) and whatever the runner adds.

Runners are registered by name (:mod:`p2pdeploy.sim.runner` says how to add one).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pdeploy.sim.churn import ChurnTraceError, LengthDistribution, SessionChurn, TraceChurn, load_trace
from p2pdeploy.sim.network import NetworkConfig
from p2pdeploy.sim.runner import BROKEN_RUNNER_MODULES, Runner, discover_runners
from p2pdeploy.sim.schema import BASE_SCHEMA, ScenarioError, Section, resolve, show
from p2pdeploy.sim.simulation import Simulation

__all__ = [
    "RunResult",
    "Scenario",
    "ScenarioError",
    "apply_override",
    "load_scenario",
    "parse_scenario",
    "run_cli",
    "run_scenario",
    "write_results",
]


@dataclass
class Scenario:
    """A validated scenario: every key resolved (defaults filled in), and its runner."""

    source: str
    values: dict[str, Any]
    runner: type[Runner]
    base_dir: Path = field(default_factory=Path.cwd)

    def get(self, dotted: str) -> Any:
        """The value of a dotted key, e.g. ``scenario.get("network.loss")``."""
        value: Any = self.values
        for part in dotted.split("."):
            value = value[part]
        return value

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values[name])

    def error(self, key: str, problem: str) -> ScenarioError:
        """An error naming this scenario's file and ``key``: ``raise scenario.error(...)``."""
        return ScenarioError(f"{self.source}: {key} {problem} (got {show(self.get(key))})")

    @property
    def name(self) -> str:
        return Path(self.source).stem


def apply_override(raw: dict[str, Any], assignment: str, *, source: str = "--set") -> str:
    """Apply one ``key=value`` to the raw (unvalidated) scenario; return the dotted key."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(f"{source}: expected KEY=VALUE, e.g. nodes=200 (got {assignment!r})")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ScenarioError(f"{source}: {key!r} is not a dotted key such as network.loss")
    value = parse_value(text)
    table = raw
    for depth, part in enumerate(parts[:-1]):
        inner = table.setdefault(part, {})
        if not isinstance(inner, dict):
            raise ScenarioError(f"{source} {key}: {'.'.join(parts[: depth + 1])} is not a table")
        table = inner
    table[parts[-1]] = value
    return key


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML (``200``, ``0.5``, ``true``, ``"x"``), else the text as a string."""
    text = text.strip()
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_scenario(
    raw: Mapping[str, Any],
    *,
    source: str = "<scenario>",
    overrides: Iterable[str] = (),
    seed: int | None = None,
    base_dir: str | Path | None = None,
) -> Scenario:
    """Validate a scenario given as a mapping (as read from TOML); see :func:`load_scenario`."""
    data = _copy_tables(raw)
    overridden = set()
    for assignment in overrides:
        overridden.add(apply_override(data, assignment))
    if seed is not None:
        data["seed"] = seed
    runners = discover_runners()
    protocol = data.get("protocol", BASE_SCHEMA["protocol"].default)  # type: ignore[union-attr]
    where = f"{source} --set" if "protocol" in overridden else source
    if type(protocol) is not str or protocol not in runners:
        broken = "".join(f"; {module} failed to import ({why})" for module, why in BROKEN_RUNNER_MODULES.items())
        raise ScenarioError(
            f"{where}: protocol must be one of {', '.join(sorted(runners))} (got {show(protocol)}){broken}"
        )
    runner = runners[protocol]
    schema: Section = {**BASE_SCHEMA, **runner.schema}
    values = resolve(data, schema, source=source, overridden=frozenset(overridden))
    scenario = Scenario(source, values, runner, Path(base_dir) if base_dir is not None else Path.cwd())
    _check_common(scenario)
    runner.check(scenario)
    return scenario


def load_scenario(path: str | Path, *, overrides: Iterable[str] = (), seed: int | None = None) -> Scenario:
    """Read and validate a TOML scenario file; raise :class:`ScenarioError` naming file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario ({exc.strerror or exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path.name}: not valid TOML ({exc})") from None
    return parse_scenario(raw, source=path.name, overrides=overrides, seed=seed, base_dir=path.parent)


def _copy_tables(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _check_common(scenario: Scenario) -> None:
    churn = scenario.values["churn"]
    if churn["model"] == "trace":
        if not churn["trace_file"]:
            raise scenario.error("churn.trace_file", 'must name a CSV file when churn.model = "trace"')
        path = scenario.base_dir / churn["trace_file"]
        if not path.is_file():
            raise scenario.error("churn.trace_file", f"must name an existing file ({path} not found)")
        try:
            load_trace(path, nodes=scenario.values["nodes"])
        except ChurnTraceError as exc:
            raise ScenarioError(f"{scenario.source}: churn.trace_file: {exc}") from None


# -- running --------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`run_scenario` returns: the summary, and the simulation for inspection."""

    scenario: Scenario
    summary: dict[str, Any]
    sim: Simulation
    runner: Runner


#: ``progress(simulated_now_s, duration_s)``, called after every chunk of the event loop.
Progress = Callable[[float, float], None]


def run_scenario(scenario: Scenario, *, progress: Progress | None = None) -> RunResult:
    """Run a validated scenario to its ``duration_s`` and summarise it."""
    values = scenario.values
    sim = Simulation(
        values["nodes"],
        seed=values["seed"],
        network=NetworkConfig(**values["network"]),
        trace=values["trace"],
        per_node_metrics=values["metrics"]["per_node"],
    )
    runner = scenario.runner(scenario, sim)
    sim.set_observer(runner.on_event)
    metrics = sim.metrics
    metrics.gauge("nodes_up", sim.nodes_up)
    for name, read in runner.gauges().items():
        metrics.gauge(name, read)
    for name, node_read in runner.node_gauges().items():
        metrics.node_gauge(name, node_read)
    for name in sim.network.counters():
        metrics.gauge(name, _network_counter(sim, name))

    runner.start()
    churn = _build_churn(scenario, sim, runner)
    if churn is not None:
        churn.start()

    duration = values["duration_s"]
    interval = values["metrics"]["sample_interval_s"]
    metrics.sample(sim.now)
    wall_s = 0.0
    ticks = 0
    # The nodes built so far live as long as the run: keep the cyclic collector from walking
    # them again and again (at 10^5 nodes: about 20k -> 25k events/s). No effect on the trace.
    gc.freeze()
    try:
        while sim.now < duration:
            ticks += 1
            until = min(duration, ticks * interval)
            started = time.perf_counter()  # measures speed for the report only; never reaches the trace
            sim.run(until)
            wall_s += time.perf_counter() - started
            metrics.sample(sim.now)
            if progress is not None:
                progress(sim.now, duration)
    finally:
        gc.unfreeze()

    events = sim.engine.events
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "protocol": values["protocol"],
        "nodes": values["nodes"],
        "duration_s": duration,
        "seed": values["seed"],
        "events": events,
        "events_per_second": round(events / wall_s) if wall_s > 0 else None,
        "wall_s": round(wall_s, 3),
        "trace_hash": sim.trace_hash,
        "nodes_up": sim.nodes_up(),
    }
    summary.update(runner.summary())
    summary.update(sim.network.counters())
    summary["stale_timer_wakeups"] = sum(host.stale_timers for host in sim.hosts)
    if churn is not None:
        summary["departures"] = churn.departures
        summary["arrivals"] = churn.arrivals
    return RunResult(scenario, summary, sim, runner)


def _network_counter(sim: Simulation, name: str) -> Callable[[], float]:
    return lambda: sim.network.counters()[name]


def _build_churn(scenario: Scenario, sim: Simulation, runner: Runner) -> SessionChurn | TraceChurn | None:
    churn = scenario.values["churn"]
    if churn["model"] == "none":
        return None
    if churn["model"] == "trace":
        try:
            transitions = load_trace(scenario.base_dir / churn["trace_file"], nodes=len(sim.hosts))
        except ChurnTraceError as exc:
            raise ScenarioError(f"{scenario.source}: churn.trace_file: {exc}") from None
        return TraceChurn(
            sim.engine, transitions, on_down=runner.on_down, on_up=runner.on_up, start_s=churn["start_s"]
        )
    session = LengthDistribution(churn["session"]["distribution"], churn["session"]["median_s"], churn["session"]["shape"])
    downtime = LengthDistribution(
        churn["downtime"]["distribution"], churn["downtime"]["median_s"], churn["downtime"]["shape"]
    )
    return SessionChurn(
        sim.engine,
        sim.streams,
        range(len(sim.hosts)),
        session,
        downtime,
        on_down=runner.on_down,
        on_up=runner.on_up,
        start_s=churn["start_s"],
    )


# -- output ---------------------------------------------------------------------------------


def write_results(result: RunResult, out_dir: str | Path) -> list[Path]:
    """Write the summary, the resolved scenario and the metrics into ``out_dir``."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    summary_path = directory / "summary.json"
    summary_path.write_text(json.dumps(result.summary, indent=2) + "\n")
    written.append(summary_path)
    scenario_json = directory / "scenario.json"
    scenario_json.write_text(json.dumps(result.scenario.values, indent=2) + "\n")
    written.append(scenario_json)
    scenario_toml = directory / "scenario.toml"
    scenario_toml.write_text(to_toml(result.scenario.values, comment=f"resolved from {result.scenario.source}"))
    written.append(scenario_toml)
    written.extend(result.sim.metrics.write(directory))
    written.extend(result.runner.write(directory))
    return written


def to_toml(values: Mapping[str, Any], *, comment: str = "") -> str:
    """TOML for a resolved scenario (scalars and nested tables only, which is all a scenario has)."""
    lines = [f"# {comment}"] if comment else []

    def emit(table: Mapping[str, Any], path: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if path and (scalars or not tables):
            lines.append("")
            lines.append(f"[{path}]")
        for key, value in scalars:
            lines.append(f"{key} = {_toml_value(value)}")
        for key, value in tables:
            emit(value, f"{path}.{key}" if path else key)

    emit(values, "")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -- the command ----------------------------------------------------------------------------

_SUMMARY_ORDER = (
    "nodes",
    "duration_s",
    "seed",
    "events",
    "events_per_second",
    "trace_hash",
)


def run_cli(
    path: str,
    *,
    seed: int | None = None,
    overrides: Iterable[str] = (),
    out: str | None = None,
    as_json: bool = False,
) -> dict[str, Any]:
    """``p2pdeploy simulate``: run, show progress on stderr, print a table (and JSON), write --out.

    A bad scenario exits with status 2 and the message, without a traceback.
    """
    import click
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    class _ScenarioUsageError(click.ClickException):
        exit_code = 2

    try:
        scenario = load_scenario(path, overrides=overrides, seed=seed)
    except ScenarioError as exc:
        raise _ScenarioUsageError(str(exc)) from None

    err_console = Console(stderr=True)
    out_console = Console(file=sys.stdout)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task(scenario.name, total=scenario.values["duration_s"], clock="t=0s")

        def progress(now: float, duration: float) -> None:
            bar.update(task, completed=now, clock=f"t={now:g}s")

        try:
            result = run_scenario(scenario, progress=progress)
        except ScenarioError as exc:
            raise _ScenarioUsageError(str(exc)) from None

    summary = result.summary
    table = Table(title=f"{scenario.name}: {scenario.values['protocol']}, seed {scenario.values['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (*_SUMMARY_ORDER, *(k for k in summary if k not in _SUMMARY_ORDER)):
        if key in summary:
            table.add_row(key, _cell(summary[key]))
    out_console.print(table)
    if out is not None:
        written = write_results(result, out)
        out_console.print(f"wrote {len(written)} files to {out}")
    if as_json:
        sys.stdout.flush()
        click.echo(json.dumps(summary, sort_keys=False))
    return summary


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, str) and len(value) > 20:
        return value[:16] + "…"
    return str(value)
