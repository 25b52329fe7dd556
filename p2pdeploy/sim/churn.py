"""Churn: when simulated nodes leave and come back.

Two sources of churn, both driving the same two hooks, ``on_down(address)`` and
``on_up(address)``, that a scenario runner implements (by default a crash that discards the
node's core, and a rejoin that hosts a new one):

- :class:`SessionChurn`, the alternating renewal model of Stutzbach and Rejaie ("Understanding
  churn in peer-to-peer networks", IMC 2006): every node alternates between a session (up)
  and a downtime (down), each length drawn independently from its own distribution. Every node
  is up when churn starts (at ``start_s``, after a warm-up if the scenario wants one) and
  begins a fresh session then.
- :class:`TraceChurn`: transitions read from a trace file, for replaying measured churn; the
  trace's time 0 is ``start_s``.

Distributions are parameterised by their **median** (the figure churn studies report, and
robust for the heavy-tailed ones) and a shape:

- ``exponential``: rate ln 2 / median (shape unused; memoryless sessions).
- ``weibull``: shape k, scale median / (ln 2)^(1/k). k < 1 gives the heavy tail measured in
  deployed P2P systems (k ≈ 0.3–0.6).
- ``pareto``: Pareto type I with shape α and minimum median / 2^(1/α). The mean is infinite
  for α ≤ 1.

Trace file format (CSV, one transition a line, ``#`` starts a comment, blank lines ignored,
an optional header line ``time_s,node,state``)::

    time_s,node,state
    12.5,3,down
    70,3,up

Transitions are applied in time order (lines with equal times in file order); a node is up
until its first ``down``. A ``down`` for a node that is already down (or ``up`` for one that is
up) is ignored at run time and counted in ``TraceChurn.ignored``.

This module models churn only; what a crash or rejoin means to a protocol is the runner's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from p2pdeploy.core import require_positive

if TYPE_CHECKING:
    from p2pdeploy.sim.engine import Engine, Streams

DISTRIBUTIONS = ("exponential", "weibull", "pareto")
_LN2 = math.log(2.0)


class ChurnTraceError(Exception):
    """A churn trace file is unreadable or has a bad line; the message names file and line."""


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """A distribution of session or downtime lengths in seconds, given by its median."""

    kind: str
    median_s: float
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)} (got {self.kind!r})")
        require_positive(self, "", "median_s", "shape")

    def sample(self, rng: random.Random) -> float:
        """One length in seconds, drawn from ``rng``."""
        if self.kind == "exponential":
            return rng.expovariate(_LN2 / self.median_s)
        if self.kind == "weibull":
            return rng.weibullvariate(self.median_s / _LN2 ** (1.0 / self.shape), self.shape)
        return self.median_s / 2.0 ** (1.0 / self.shape) * rng.paretovariate(self.shape)

    @property
    def mean_s(self) -> float:
        """The mean length (``math.inf`` for a Pareto with shape <= 1)."""
        if self.kind == "exponential":
            return self.median_s / _LN2
        if self.kind == "weibull":
            scale = self.median_s / _LN2 ** (1.0 / self.shape)
            return scale * math.gamma(1.0 + 1.0 / self.shape)
        if self.shape <= 1.0:
            return math.inf
        minimum = self.median_s / 2.0 ** (1.0 / self.shape)
        return self.shape * minimum / (self.shape - 1.0)


Hook = Callable[[int], None]


class _Churn:
    """What both sources of churn share: the engine, the two hooks they drive, when they start,
    and how many departures and arrivals they caused."""

    def __init__(self, engine: Engine, *, on_down: Hook, on_up: Hook, start_s: float) -> None:
        self.engine = engine
        self.start_s = start_s
        self.on_down = on_down
        self.on_up = on_up
        self.departures = 0
        self.arrivals = 0

    def _leave(self, address: int) -> None:
        self.departures += 1
        self.on_down(address)

    def _return(self, address: int) -> None:
        self.arrivals += 1
        self.on_up(address)


class SessionChurn(_Churn):
    """Alternating up/down periods per node, drawn from two distributions.

    Node ``i`` draws from its own stream ``streams.get("churn", i)``, so its history does not
    depend on how many other nodes there are. ``start()`` schedules every node's first
    departure, one session after ``start_s``; after that each transition schedules the next.
    """

    def __init__(
        self,
        engine: Engine,
        streams: Streams,
        addresses: Sequence[int],
        session: LengthDistribution,
        downtime: LengthDistribution,
        *,
        on_down: Hook,
        on_up: Hook,
        start_s: float = 0.0,
    ) -> None:
        super().__init__(engine, on_down=on_down, on_up=on_up, start_s=start_s)
        self.streams = streams
        self.addresses = addresses
        self.session = session
        self.downtime = downtime
        self._down_cb = self._go_down
        self._up_cb = self._come_up

    def start(self) -> None:
        begin = max(self.engine.now, self.start_s)
        for address in self.addresses:
            rng = self.streams.get("churn", address)
            self.engine.schedule(begin + self.session.sample(rng), self._down_cb, address)

    def _go_down(self, address: int) -> None:
        self._leave(address)
        rng = self.streams.get("churn", address)
        self.engine.schedule(self.engine.now + self.downtime.sample(rng), self._up_cb, address)

    def _come_up(self, address: int) -> None:
        self._return(address)
        rng = self.streams.get("churn", address)
        self.engine.schedule(self.engine.now + self.session.sample(rng), self._down_cb, address)


@dataclass(frozen=True, slots=True)
class Transition:
    """One line of a churn trace: ``node`` goes ``up`` or ``down`` at ``time_s``."""

    time_s: float
    node: int
    up: bool


def parse_trace(lines: Sequence[str] | str, *, source: str = "<trace>", nodes: int | None = None) -> list[Transition]:
    """Parse trace lines (see the module docstring); errors name ``source`` and the line."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out: list[Transition] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [field.strip() for field in line.split(",")]
        if not out and fields == ["time_s", "node", "state"]:
            continue
        where = f"{source}:{number}"
        if len(fields) != 3:
            raise ChurnTraceError(f"{where}: expected time_s,node,state (got {raw.strip()!r})")
        time_text, node_text, state = fields
        try:
            time_s = float(time_text)
        except ValueError:
            raise ChurnTraceError(f"{where}: time_s must be a number of seconds (got {time_text!r})") from None
        if not (math.isfinite(time_s) and time_s >= 0):
            raise ChurnTraceError(f"{where}: time_s must be >= 0 (got {time_text!r})")
        try:
            node = int(node_text)
        except ValueError:
            raise ChurnTraceError(f"{where}: node must be an integer (got {node_text!r})") from None
        if node < 0 or (nodes is not None and node >= nodes):
            limit = f"0..{nodes - 1}" if nodes is not None else ">= 0"
            raise ChurnTraceError(f"{where}: node must be in {limit} (got {node})")
        if state not in ("up", "down"):
            raise ChurnTraceError(f"{where}: state must be up or down (got {state!r})")
        out.append(Transition(time_s, node, state == "up"))
    return out


def load_trace(path: str | Path, *, nodes: int | None = None) -> list[Transition]:
    """Read a churn trace file; raise :class:`ChurnTraceError` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ChurnTraceError(f"{path}: cannot read churn trace ({exc.strerror or exc})") from None
    return parse_trace(text, source=str(path), nodes=nodes)


class TraceChurn(_Churn):
    """Replays a list of :class:`Transition` through the ``on_down`` / ``on_up`` hooks.

    A transition at ``time_s`` happens at ``start_s + time_s``.
    """

    def __init__(
        self,
        engine: Engine,
        transitions: Sequence[Transition],
        *,
        on_down: Hook,
        on_up: Hook,
        start_s: float = 0.0,
    ) -> None:
        super().__init__(engine, on_down=on_down, on_up=on_up, start_s=start_s)
        self.transitions = sorted(transitions, key=lambda t: t.time_s)  # stable: file order at ties
        self.ignored = 0
        self._down: set[int] = set()

    def start(self) -> None:
        now = self.engine.now
        for transition in self.transitions:
            at = self.start_s + transition.time_s
            if at >= now:
                self.engine.schedule(at, self._apply, transition.node, transition.up)

    def _apply(self, address: int, up: bool) -> None:
        if up == (address not in self._down):
            self.ignored += 1
            return
        if up:
            self._down.discard(address)
            self._return(address)
        else:
            self._down.add(address)
            self._leave(address)
