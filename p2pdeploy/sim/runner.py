"""Scenario runners: what a scenario's ``protocol`` field selects, and how to add one.

A runner decides which sans-I/O core every simulated node hosts, what the core's events mean
for the metrics, and what the run's summary reports. The scenario machinery
(:mod:`p2pdeploy.sim.scenario`) does the rest the same way for every runner: building the
:class:`~p2pdeploy.sim.simulation.Simulation` from the ``[network]`` table, churn from
``[churn]``, sampling ``[metrics]``, the progress bar and the output files.

To add a runner (the Kademlia overlay will register ``"overlay"`` this way):

1. create a module in ``p2pdeploy/sim/runners/`` (every module there is imported when a
   scenario names a protocol, so nothing else needs editing);
2. subclass :class:`Runner`, set ``name`` (the value of ``protocol`` in scenario files) and
   ``schema`` (the tables this runner adds, e.g. ``{"overlay": {"k": Field(20, int, ..., ge=1)}}``;
   each key needs a default and a doc, and validation comes with it);
3. implement :meth:`Runner.make_core`, and override :meth:`Runner.join`, :meth:`Runner.on_event`,
   :meth:`Runner.on_down`, :meth:`Runner.on_up` and :meth:`Runner.summary` as needed;
4. decorate the class with :func:`register_runner`.

Churn reaches a runner through two hooks: :meth:`Runner.on_down` (default: the node crashes,
its core is discarded) and :meth:`Runner.on_up` (default: :meth:`Runner.join`, a new core, as a
machine that restarts). Override them to harvest a core's counters before it is lost or to
bootstrap a rejoining node.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from p2pdeploy.core import Protocol
from p2pdeploy.sim.schema import Section

if TYPE_CHECKING:
    from p2pdeploy.sim.host import SimNode
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation

RUNNERS: dict[str, type[Runner]] = {}
#: Runner modules that failed to import, with the reason (named when their protocol is asked for).
BROKEN_RUNNER_MODULES: dict[str, str] = {}
R = TypeVar("R", bound="type[Runner]")


def register_runner(cls: R) -> R:
    """Class decorator: make ``cls`` the runner for scenarios with ``protocol = cls.name``."""
    name = cls.name
    if not name:
        raise ValueError(f"{cls.__name__} must set a name to be registered")
    existing = RUNNERS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"runner {name!r} is already registered by {existing.__qualname__}")
    RUNNERS[name] = cls
    return cls


def discover_runners() -> dict[str, type[Runner]]:
    """Import every module of ``p2pdeploy.sim.runners`` (they register themselves).

    A module that fails to import does not take the other runners down with it: the failure is
    kept in :data:`BROKEN_RUNNER_MODULES` and reported when a scenario names an unknown protocol.
    """
    package = importlib.import_module("p2pdeploy.sim.runners")
    for module in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # a runner under construction must not break the others
            BROKEN_RUNNER_MODULES[name] = f"{type(exc).__name__}: {exc}"
        else:
            BROKEN_RUNNER_MODULES.pop(name, None)
    return dict(RUNNERS)


class Runner:
    """Base class of a scenario runner; see the module docstring for how to write one."""

    #: The value of ``protocol`` in a scenario file that selects this runner.
    name: ClassVar[str] = ""
    #: Tables this runner adds to the scenario schema.
    schema: ClassVar[dict[str, Section]] = {}

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        self.scenario = scenario
        self.sim = sim

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        """Checks across keys, after each key was validated; raise via ``scenario.error(key, problem)``."""

    # -- building nodes --------------------------------------------------------------------
    def make_core(self, address: int) -> Protocol:
        """A new core for node ``address`` (at the first start and at every rejoin)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start every node at time 0 (default: :meth:`join` each address in order)."""
        for host in self.sim.hosts:
            self.join(host.address)

    def join(self, address: int) -> None:
        """Host a new core on node ``address``."""
        self.sim.hosts[address].start(self.make_core(address))

    # -- what happens ----------------------------------------------------------------------
    def on_event(self, address: int, event: Any) -> None:
        """An event emitted by the core on ``address`` (drained by the host after each input)."""

    def on_down(self, address: int) -> None:
        """Churn took ``address`` down: by default it crashes and its core is discarded."""
        self.sim.hosts[address].crash()

    def on_up(self, address: int) -> None:
        """Churn brought ``address`` back: by default it rejoins with a new core."""
        self.join(address)

    def gauges(self) -> dict[str, Callable[[], float]]:
        """Global values to sample into the time series."""
        return {}

    def node_gauges(self) -> dict[str, Callable[[int], float | None]]:
        """Per-node values to sample into ``nodes.csv``."""
        return {}

    # -- results ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Summary metrics of the run (merged into the scenario's summary)."""
        return {}

    def write(self, out_dir: Path) -> list[Path]:
        """Write runner-specific result files into ``out_dir``; return their paths."""
        return []


class SummedCounters:
    """One layer's counters summed over every node for the whole run: what the hosted cores
    count now plus what the cores lost to churn had counted (a runner calls :meth:`harvest`
    in :meth:`Runner.on_down`, before the core is discarded)."""

    def __init__(self, keys: Iterable[str], counters_of: Callable[[Protocol], Mapping[str, int]]) -> None:
        self.keys = tuple(keys)
        self.counters_of = counters_of
        self.harvested = dict.fromkeys(self.keys, 0)

    def harvest(self, core: Protocol | None) -> None:
        """Keep the counts of a core about to be lost."""
        if core is not None:
            self._add(self.harvested, core)

    def totals(self, hosts: Iterable[SimNode]) -> dict[str, int]:
        """Every count so far: the harvested ones and those of the cores ``hosts`` hold now."""
        totals = dict(self.harvested)
        for host in hosts:
            if host.core is not None:
                self._add(totals, host.core)
        return totals

    def _add(self, into: dict[str, int], core: Protocol) -> None:
        counters = self.counters_of(core)
        for key in self.keys:
            into[key] += counters.get(key, 0)
