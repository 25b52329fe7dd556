"""The ``detector`` runner: one SWIM/Lifeguard failure detector per node, with kills and pauses.

Every node hosts a :class:`~p2pdeploy.overlay.swim.FailureDetector` (node ids derived from the
seed, as the ping runner's ``hash`` identities) and watches between ``detector.watch_min`` and
``detector.watch_max`` other nodes drawn at random, as a node's layers would watch their
neighbours. Then, from ``kill_start_s``, a random live node is killed (its core crashes) every
``kill_interval_s``, ``kills`` times; and from ``pause_start_s`` a random live node is paused
(:meth:`~p2pdeploy.sim.host.SimNode.pause`: it neither receives, sends nor runs a timer) for
``pause_s`` every ``pause_interval_s``, ``pauses`` times (a node may be paused more than once; a
paused node is not killed, nor paused again while paused).

Measured:

- a *detection* is a pair (killed node, watcher): a watcher that was live at the kill and stays
  live; its latency is the time from the kill to the watcher's ``PeerDeclaredDead`` for that node.
  Pairs still undetected at the end are ``undetected`` (give the run time after the last kill);
- a *false death* is a ``PeerDeclaredDead`` about a node that was not killed (alive, or paused);
  ``false_suspicions`` counts ``PeerSuspected`` about such nodes (harmless when refuted);
- ``messages_per_node_per_s``: every message sent, over nodes × duration.

JSON keys: ``detection_median_s``, ``detection_p99_s``, ``detection_max_s``, ``detections``,
``undetected``, ``false_deaths``, ``false_suspicions``, ``refutations``, ``messages_per_node_per_s``,
``kills``, ``pauses``, ``health_max`` (the highest local health score a live node had at the end).
Churn is not used here (``churn.model`` must be ``"none"``): kills and pauses are the faults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Protocol
from p2pdeploy.overlay.identity import node_id_of
from p2pdeploy.overlay.swim import DetectorConfig, FailureDetector, PeerDeclaredDead, PeerSuspected
from p2pdeploy.sim.metrics import rounded
from p2pdeploy.sim.runner import Runner, register_runner
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation


@register_runner
class DetectorRunner(Runner):
    name = "detector"
    schema = {
        "detector": {
            "watch_min": Field(10, int, "each node watches at least this many random others", ge=1),
            "watch_max": Field(20, int, "and at most this many", ge=1),
            **config_keys(
                DetectorConfig,
                protocol_period_s=Tunable("SWIM protocol period, seconds", gt=0),
                probe_timeout_s=Tunable("direct probe timeout, seconds", gt=0),
                indirect_probes=Tunable("ping-req fan-out k", ge=0),
                suspicion_min_mult=Tunable("shortest suspicion, in protocol periods", gt=0),
                suspicion_max_mult=Tunable("longest suspicion, as a multiple of the shortest", ge=1),
                confirmations=Tunable("Lifeguard's K", ge=0),
                lha_max=Tunable("local health: timeouts scale up to this factor", ge=1),
            ),
            "kills": Field(5, int, "how many nodes are killed (crash, never come back)", ge=0),
            "kill_start_s": Field(10.0, float, "first kill, seconds", ge=0),
            "kill_interval_s": Field(5.0, float, "seconds between kills", gt=0),
            "pauses": Field(0, int, "how many pauses (of a random live node each)", ge=0),
            "pause_s": Field(2.0, float, "how long a pause lasts, seconds", gt=0),
            "pause_start_s": Field(10.0, float, "first pause, seconds", ge=0),
            "pause_interval_s": Field(5.0, float, "seconds between pauses", gt=0),
        }
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        values = scenario.values
        settings = values["detector"]
        if values["churn"]["model"] != "none":
            raise scenario.error(
                "churn.model", 'must be "none" for protocol "detector" (kills and pauses are its faults)'
            )
        if settings["watch_max"] < settings["watch_min"]:
            raise scenario.error("detector.watch_max", "must be >= detector.watch_min")
        if settings["watch_max"] >= values["nodes"]:
            raise scenario.error("detector.watch_max", "must be smaller than nodes")
        if settings["kills"] >= values["nodes"] - 1:
            raise scenario.error("detector.kills", "must leave at least two nodes alive")
        if not settings["probe_timeout_s"] < settings["protocol_period_s"]:
            raise scenario.error(
                "detector.probe_timeout_s", "must be shorter than detector.protocol_period_s"
            )

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        settings = scenario.section("detector")
        self.settings = settings
        nodes = len(sim.hosts)
        self.config = config_from(settings, DetectorConfig)
        streams = sim.streams
        self.node_ids = [node_id_of(streams.bytes("identity", i)) for i in range(nodes)]
        self.address_of = {node_id: address for address, node_id in enumerate(self.node_ids)}
        choose = streams.get("detector", 0)
        self.watches: list[list[int]] = []
        for address in range(nodes):
            count = choose.randint(settings["watch_min"], settings["watch_max"])
            others = [a for a in range(nodes) if a != address]
            self.watches.append(choose.sample(others, count))
        self.watchers: list[list[int]] = [[] for _ in range(nodes)]
        for address, watched in enumerate(self.watches):
            for other in watched:
                self.watchers[other].append(address)
        self.detectors: list[FailureDetector | None] = [None] * nodes
        self.killed_at: dict[int, float] = {}
        self.paused_now: set[int] = set()
        self.pauses_done = 0
        #: (killed, watcher) -> latency in seconds, for watchers live at the kill.
        self.pending: dict[tuple[int, int], float] = {}
        self.latencies: list[float] = sim.metrics.distributions.setdefault("detection_s", [])
        self.false_deaths = 0
        self.false_suspicions = 0
        self.refutations_by_killed = 0
        self._faults = streams.get("detector", 1)

    # -- nodes -----------------------------------------------------------------------------
    def make_core(self, address: int) -> Protocol:
        host = self.sim.hosts[address]
        rng = self.sim.streams.fresh("node", address, host.incarnation + 1)
        detector = FailureDetector(self.node_ids[address], rng, self.config)
        self.detectors[address] = detector
        return detector

    def start(self) -> None:
        for host in self.sim.hosts:
            self.join(host.address)
            host.call(
                lambda core, now, watched=self.watches[host.address]: self._watch_all(core, watched, now)
            )
        engine = self.sim.engine
        s = self.settings
        for index in range(s["kills"]):
            engine.schedule(s["kill_start_s"] + index * s["kill_interval_s"], self._kill)
        for index in range(s["pauses"]):
            engine.schedule(s["pause_start_s"] + index * s["pause_interval_s"], self._pause)

    def _watch_all(self, core: FailureDetector, watched: list[int], now: float) -> None:
        for other in watched:
            core.watch(self.node_ids[other], other, now)

    def _live(self) -> list[int]:
        return [a for a in range(len(self.sim.hosts)) if a not in self.killed_at and a not in self.paused_now]

    def _kill(self) -> None:
        victim = self._faults.choice(self._live())
        now = self.sim.now
        self.killed_at[victim] = now
        detector = self.detectors[victim]
        if detector is not None:
            self.refutations_by_killed += detector.stats.refutations
        self.sim.hosts[victim].crash()
        self.detectors[victim] = None
        for watcher in self.watchers[victim]:
            if watcher not in self.killed_at:
                self.pending[(victim, watcher)] = now
        for key in [key for key in self.pending if key[1] == victim]:
            del self.pending[key]  # a dead watcher detects nothing

    def _pause(self) -> None:
        candidates = self._live()
        victim = self._faults.choice(candidates)
        self.paused_now.add(victim)
        self.pauses_done += 1
        self.sim.hosts[victim].pause()
        self.sim.engine.schedule(self.sim.now + self.settings["pause_s"], self._resume, victim)

    def _resume(self, victim: int) -> None:
        self.paused_now.discard(victim)
        self.sim.hosts[victim].resume()

    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is PeerDeclaredDead:
            subject = self.address_of.get(event.node_id)
            if subject is None or subject not in self.killed_at:
                self.false_deaths += 1
                return
            killed_at = self.pending.pop((subject, address), None)
            if killed_at is not None:
                self.latencies.append(self.sim.now - killed_at)
        elif kind is PeerSuspected:
            subject = self.address_of.get(event.node_id)
            if subject is None or subject not in self.killed_at:
                self.false_suspicions += 1

    # -- results ---------------------------------------------------------------------------
    def gauges(self) -> dict[str, Any]:
        return {
            "false_deaths": lambda: self.false_deaths,
            "false_suspicions": lambda: self.false_suspicions,
            "health_max": self._health_max,
        }

    def _health_max(self) -> int:
        return max((d.health for d in self.detectors if d is not None), default=0)

    def summary(self) -> dict[str, Any]:
        metrics = self.sim.metrics
        nodes = len(self.sim.hosts)
        duration = self.sim.now
        refutations = self.refutations_by_killed + sum(
            d.stats.refutations for d in self.detectors if d is not None
        )
        return {
            "detection_median_s": rounded(metrics.median("detection_s"), 3),
            "detection_p99_s": rounded(metrics.percentile("detection_s", 0.99), 3),
            "detection_max_s": rounded(max(self.latencies, default=None), 3),
            "detections": len(self.latencies),
            "undetected": len(self.pending),
            "false_deaths": self.false_deaths,
            "false_suspicions": self.false_suspicions,
            "refutations": refutations,
            "messages_per_node_per_s": rounded(self.sim.network.sent / (nodes * duration), 3)
            if duration > 0
            else None,
            "kills": len(self.killed_at),
            "pauses": self.pauses_done,
            "health_max": self._health_max(),
        }
