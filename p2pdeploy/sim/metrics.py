"""Metrics of a simulation run: counters, gauges and sample distributions, global and per node.

- Counters only grow: ``metrics.incr("pongs")`` (global) or ``metrics.node_counter("pongs")[i] += 1``
  (per node, a plain list indexed by address, so the hot path is one list store).
- Gauges are read when a sample is taken: ``metrics.gauge("nodes_up", fn)`` (global) and
  ``metrics.node_gauge("srtt_ms", fn)`` (``fn(address)``, ``None`` when there is no value).
- Distributions keep every observation: ``metrics.observe("rtt_ms", 41.2)``; summaries read
  their median and percentiles.

``sample(now)`` records one row of every global counter and gauge (the time series) and, when
``per_node`` is set, one row per node. The scenario runner samples between chunks of the event
loop, outside the engine, so the sampling interval never changes the event trace.
:meth:`Metrics.write` writes the series as CSV (one column per metric) and as JSON lines.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class Metrics:
    """Counters, gauges, distributions and their sampled time series for ``nodes`` nodes."""

    def __init__(self, nodes: int, *, per_node: bool = True) -> None:
        self.nodes = nodes
        self.per_node = per_node
        self.counters: Counter[str] = Counter()
        self.distributions: dict[str, list[float]] = {}
        self._node_counters: dict[str, list[int]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._node_gauges: dict[str, Callable[[int], float | None]] = {}
        #: ``(time_s, {metric: value})`` per sample, global.
        self.series: list[tuple[float, dict[str, float]]] = []
        #: ``(time_s, {metric: [value per node]})`` per sample.
        self.node_series: list[tuple[float, dict[str, list[float | None]]]] = []

    # -- recording -------------------------------------------------------------------------
    def incr(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def node_counter(self, name: str) -> list[int]:
        """The per-node counter ``name``: a list indexed by address, to increment in place."""
        counter = self._node_counters.get(name)
        if counter is None:
            counter = self._node_counters[name] = [0] * self.nodes
        return counter

    def observe(self, name: str, value: float) -> None:
        values = self.distributions.get(name)
        if values is None:
            values = self.distributions[name] = []
        values.append(value)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def node_gauge(self, name: str, read: Callable[[int], float | None]) -> None:
        self._node_gauges[name] = read

    # -- sampling --------------------------------------------------------------------------
    def sample(self, now: float) -> None:
        row: dict[str, float] = dict(sorted(self.counters.items()))
        for name, read in self._gauges.items():
            row[name] = read()
        for name, counter in self._node_counters.items():
            row.setdefault(name, sum(counter))
        self.series.append((now, row))
        if self.per_node:
            per: dict[str, list[float | None]] = {}
            for name, counter in self._node_counters.items():
                per[name] = list(counter)
            for name, node_read in self._node_gauges.items():
                per[name] = [node_read(address) for address in range(self.nodes)]
            self.node_series.append((now, per))

    def median(self, name: str) -> float | None:
        values = self.distributions.get(name)
        return statistics.median(values) if values else None

    def percentile(self, name: str, fraction: float) -> float | None:
        """The ``fraction`` quantile (nearest rank) of a distribution, ``None`` when empty."""
        values = self.distributions.get(name)
        if not values:
            return None
        ordered = sorted(values)
        rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return ordered[rank]

    # -- output ----------------------------------------------------------------------------
    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``timeseries.csv``/``.jsonl`` and, per node, ``nodes.csv``/``.jsonl``."""
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        written = [self._write_global(directory)]
        written.extend(self._write_global_jsonl(directory))
        if self.per_node and self.node_series:
            written.extend(self._write_nodes(directory))
        return written

    def _global_columns(self) -> list[str]:
        return _union(row.keys() for _, row in self.series)

    def _write_global(self, directory: Path) -> Path:
        path = directory / "timeseries.csv"
        columns = self._global_columns()
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time_s", *columns])
            for now, row in self.series:
                writer.writerow([_fmt(now), *(_fmt(row.get(name)) for name in columns)])
        return path

    def _write_global_jsonl(self, directory: Path) -> list[Path]:
        path = directory / "timeseries.jsonl"
        with path.open("w") as handle:
            for now, row in self.series:
                handle.write(json.dumps({"time_s": now, **row}, default=str) + "\n")
        return [path]

    def _write_nodes(self, directory: Path) -> list[Path]:
        columns = _union(per.keys() for _, per in self.node_series)
        csv_path = directory / "nodes.csv"
        jsonl_path = directory / "nodes.jsonl"
        with csv_path.open("w", newline="") as csv_handle, jsonl_path.open("w") as jsonl_handle:
            writer = csv.writer(csv_handle)
            writer.writerow(["time_s", "node", *columns])
            for now, per in self.node_series:
                for address in range(self.nodes):
                    values = [per[name][address] if name in per else None for name in columns]
                    writer.writerow([_fmt(now), address, *(_fmt(v) for v in values)])
                    record = {"time_s": now, "node": address, **dict(zip(columns, values, strict=True))}
                    jsonl_handle.write(json.dumps(record) + "\n")
        return [csv_path, jsonl_path]


def _union(groups: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        for name in group:
            seen.setdefault(name)
    return list(seen)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 9))
    return str(value)


# -- summary values -------------------------------------------------------------------------
# The runners' summaries round what they report with these, so a JSON summary shows 6 (or 3)
# decimals, and None where there was nothing to measure.


def rounded(value: float | None, digits: int = 6) -> float | None:
    """``value`` rounded to ``digits`` decimals; None stays None."""
    return None if value is None else round(value, digits)


def ratio(part: float, whole: float) -> float | None:
    """``part / whole`` rounded to 6 decimals; None when ``whole`` is 0."""
    return round(part / whole, 6) if whole else None


def percentile_of_sorted(values: list[Any], fraction: float) -> Any:
    """The element at ``fraction`` of the way through the sorted list ``values`` (index
    ``int(fraction * len)``, the last for 1.0); None when it is empty."""
    if not values:
        return None
    return values[min(len(values) - 1, int(fraction * len(values)))]
