"""The ``ping`` runner: every node pings a random node every ``ping.interval_s`` and estimates RTTs.

The smallest workload that exercises the whole simulator (network model, timers, churn, metrics)
with a real sans-I/O core, :class:`~p2pdeploy.overlay.ping.PingProtocol`. Each node ``i`` hosts
``Stack([PingProtocol(node_id, rng, interval_s=..., peers=range(nodes), own_address=i)])``
(or the protocol alone with ``ping.stack = false``), with its own random stream
``streams.fresh("node", i, incarnation)`` and a node id derived from the seed:

- ``ping.identities = "ed25519"``: ``Identity.from_seed(streams.bytes("identity", i)).node_id``,
  as a real node derives its id from its key (about 0.1 ms per node);
- ``"hash"``: ``node_id_of(streams.bytes("identity", i))``, the same distribution of ids
  without building key pairs, for very large runs.

A node keeps its id across a crash and rejoin (its key is in its data directory); its pings in
flight at the crash are lost and counted as ``pings_abandoned``.

Summary: ``pings_sent``, ``pings_answered``, ``pings_timed_out``, ``pings_abandoned``,
``pings_in_flight`` (sent by live nodes, neither answered nor timed out at the end),
``answer_ratio`` (answered / sent), ``rtt_median_ms`` / ``rtt_p90_ms`` / ``rtt_p99_ms``, and
``modelled_rtt_median_ms``: twice the median pairwise one-way latency of the network model plus
the mean jitter of the two messages, which ``rtt_median_ms`` approaches in a lossless network.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity, node_id_of
from p2pdeploy.overlay.ping import PingProtocol, PingTimedOut, PongReceived
from p2pdeploy.sim.metrics import rounded
from p2pdeploy.sim.network import pair_latency_median_s
from p2pdeploy.sim.runner import Runner, register_runner
from p2pdeploy.sim.schema import Field

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation


@register_runner
class PingRunner(Runner):
    name = "ping"
    schema = {
        "ping": {
            "interval_s": Field(1.0, float, "each node pings a random node this often, seconds", gt=0),
            "identities": Field(
                "ed25519",
                str,
                "node ids: ed25519 (from a seeded key pair, as real nodes) or hash (same ids' distribution, no keys)",
                choices=("ed25519", "hash"),
            ),
            "stack": Field(True, bool, "host PingProtocol inside a core.Stack (false: the protocol alone)"),
        }
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        if scenario.values["nodes"] < 2:
            raise scenario.error("nodes", 'must be >= 2 for protocol "ping"')

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        settings = scenario.section("ping")
        nodes = len(sim.hosts)
        self.interval_s: float = settings["interval_s"]
        self.stack: bool = settings["stack"]
        streams = sim.streams
        if settings["identities"] == "ed25519":
            self.node_ids = [Identity.from_seed(streams.bytes("identity", i)).node_id for i in range(nodes)]
        else:
            self.node_ids = [node_id_of(streams.bytes("identity", i)) for i in range(nodes)]
        self.peers = range(nodes)
        #: The live PingProtocol of each node (``None`` while it is down).
        self.pings: list[PingProtocol | None] = [None] * nodes
        metrics = sim.metrics
        self.answered = metrics.node_counter("pings_answered")
        self.timed_out = metrics.node_counter("pings_timed_out")
        self.sent_by_past_cores = [0] * nodes
        self.abandoned = 0
        self.rtt_ms: list[float] = metrics.distributions.setdefault("rtt_ms", [])
        self._window_start = 0

    # -- nodes -----------------------------------------------------------------------------
    def make_core(self, address: int) -> Protocol:
        host = self.sim.hosts[address]
        rng = self.sim.streams.fresh("node", address, host.incarnation + 1)
        ping = PingProtocol(
            self.node_ids[address],
            rng,
            interval_s=self.interval_s,
            peers=self.peers,
            own_address=address,
        )
        self.pings[address] = ping
        return Stack([ping]) if self.stack else ping

    def join(self, address: int) -> None:
        super().join(address)
        self.sim.hosts[address].call(partial(_start_pinging, self.pings[address]))

    def on_down(self, address: int) -> None:
        ping = self.pings[address]
        if ping is not None:
            stats = ping.stats
            self.sent_by_past_cores[address] += stats.sent
            self.abandoned += stats.sent - stats.answered - stats.timed_out
            self.pings[address] = None
        super().on_down(address)

    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is PongReceived:
            self.answered[address] += 1
            self.rtt_ms.append(event.rtt_s * 1000.0)
        elif kind is PingTimedOut:
            self.timed_out[address] += 1

    # -- metrics ---------------------------------------------------------------------------
    def sent(self, address: int) -> int:
        ping = self.pings[address]
        return self.sent_by_past_cores[address] + (ping.stats.sent if ping is not None else 0)

    def gauges(self) -> dict[str, Any]:
        return {
            "pings_sent": lambda: sum(self.sent(a) for a in self.peers),
            "rtt_median_ms_window": self._window_median,
        }

    def node_gauges(self) -> dict[str, Any]:
        return {"pings_sent": self.sent}

    def _window_median(self) -> float | None:
        window = sorted(self.rtt_ms[self._window_start :])
        self._window_start = len(self.rtt_ms)
        if not window:
            return None
        return round(window[len(window) // 2], 6)

    def summary(self) -> dict[str, Any]:
        metrics = self.sim.metrics
        sent = sum(self.sent(a) for a in self.peers)
        answered = sum(self.answered)
        timed_out = sum(self.timed_out)
        network = self.sim.network
        modelled = 2 * pair_latency_median_s(network, seed=self.sim.seed) + network.jitter_s
        return {
            "rtt_median_ms": rounded(metrics.median("rtt_ms"), 3),
            "rtt_p90_ms": rounded(metrics.percentile("rtt_ms", 0.9), 3),
            "rtt_p99_ms": rounded(metrics.percentile("rtt_ms", 0.99), 3),
            "modelled_rtt_median_ms": rounded(modelled * 1000.0, 3),
            "pings_sent": sent,
            "pings_answered": answered,
            "pings_timed_out": timed_out,
            "pings_abandoned": self.abandoned,
            "pings_in_flight": sent - answered - timed_out - self.abandoned,
            "answer_ratio": round(answered / sent, 6) if sent else None,
        }


def _start_pinging(ping: PingProtocol | None, core: Protocol, now: float) -> None:
    assert ping is not None
    ping.start(now)
