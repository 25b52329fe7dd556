"""The deterministic discrete-event simulator: the second driver of the sans-I/O cores.

One heap of timed events and a virtual clock (:mod:`~p2pdeploy.sim.engine`), a modelled
network with per-pair latency, jitter, loss and bandwidth for large messages
(:mod:`~p2pdeploy.sim.network`), a host that drives one core per node with the same contract
as the trio runtime (:mod:`~p2pdeploy.sim.host`), churn from session distributions or trace
files (:mod:`~p2pdeploy.sim.churn`), metrics (:mod:`~p2pdeploy.sim.metrics`), and TOML scenario
files run by ``p2pdeploy simulate`` (:mod:`~p2pdeploy.sim.scenario`, with runners registered
in :mod:`~p2pdeploy.sim.runner`). One seed gives one run: the event-trace hash is identical.

It models the network and churn, nothing else: protocol decisions stay in the cores. It never
imports trio, socket, subprocess or asyncio, never draws from the global ``random`` module
and never reads the wall clock except to report events per second.
"""

from p2pdeploy.sim.churn import LengthDistribution, SessionChurn, TraceChurn, Transition, load_trace
from p2pdeploy.sim.engine import Engine, Streams
from p2pdeploy.sim.host import NodeDown, SimNode
from p2pdeploy.sim.metrics import Metrics
from p2pdeploy.sim.network import Network, NetworkConfig, WireSizer
from p2pdeploy.sim.runner import Runner, register_runner
from p2pdeploy.sim.scenario import RunResult, Scenario, load_scenario, parse_scenario, run_scenario
from p2pdeploy.sim.schema import Field, ScenarioError
from p2pdeploy.sim.simulation import Simulation

__all__ = [
    "Engine",
    "Field",
    "LengthDistribution",
    "Metrics",
    "Network",
    "NetworkConfig",
    "NodeDown",
    "RunResult",
    "Runner",
    "Scenario",
    "ScenarioError",
    "SessionChurn",
    "SimNode",
    "Simulation",
    "Streams",
    "TraceChurn",
    "Transition",
    "WireSizer",
    "load_scenario",
    "load_trace",
    "parse_scenario",
    "register_runner",
    "run_scenario",
]
