"""The ``broadcast`` runner: El-Ansary broadcasts over the Kademlia overlay, static or under churn.

Every node hosts a :class:`~p2pdeploy.core.Stack` of the overlay and a
:class:`~p2pdeploy.overlay.broadcast.Broadcast`. The network is built by the ``overlay`` runner
(``overlay.build = "oracle"`` for 10^4 nodes, ``"join"`` for the real bootstrap; its churn hooks
apply). From ``broadcast.delay_s`` after the build settled, a random live node starts a broadcast
every ``interval_s``: best effort, reliable, or the two alternating (``mode``).

Each broadcast is measured over its window ``[start, start + window_s]``:

- its *audience* is the nodes **alive for the whole broadcast**: joined before it started and
  not down at any time in the window (in a static run, every node);
- its *coverage* is the fraction of the audience that delivered it (the initiator counts);
- its *data messages* and *acknowledgements* (reliable mode) are the messages of that kind sent
  by all nodes in the window, counted separately; ``messages_per_node`` is data messages per
  node alive at the start, for the mode that needed more of them;
- its *depth* is the largest hop count at which a node received it.

JSON keys: ``coverage`` (the lowest over all broadcasts), ``coverage_best_effort`` and
``coverage_reliable`` (audience reached over audience, all broadcasts of the mode together) with
their ``_min``; ``origin_crashed_reliable`` counts reliable broadcasts whose initiator went down
in their window (no broadcast survives a sender that fails before its first delegates accepted),
and ``coverage_reliable_origin_up`` leaves them out; ``messages_per_node``, ``messages_per_node_best_effort``/``_reliable``,
``acks_per_node_reliable``, ``depth_max``, ``depth_mean``, ``log2_n``, ``delivery_time_p99_s``,
``unreached_blocks`` (blocks the reliable initiators' trees gave up).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.broadcast import Broadcast, BroadcastCompleted, BroadcastDelivered, SpreadConfig
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.sim.metrics import percentile_of_sorted, rounded
from p2pdeploy.sim.runner import SummedCounters, register_runner
from p2pdeploy.sim.runners.overlay import OverlayRunner, overlay_table_without_lookups
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation

MODES = ("best_effort", "reliable", "both")
COUNTERS = ("data_sent", "data_sent_reliable", "acks_sent")


class _Run:
    """One broadcast under measurement."""

    __slots__ = ("index", "mode", "origin", "start", "end", "broadcast_id", "reached", "hops", "times",
                 "counters_at_start", "nodes_at_start", "audience", "data", "acks", "completed", "unreached",
                 "origin_crashed")

    def __init__(self, index: int, mode: str, start: float, end: float) -> None:
        self.index = index
        self.mode = mode
        self.origin: int | None = None
        self.start = start
        self.end = end
        self.broadcast_id: int | None = None
        self.reached: set[int] = set()
        self.hops: list[int] = []
        self.times: list[float] = []
        self.counters_at_start: dict[str, int] = {}
        self.nodes_at_start = 0
        self.audience: set[int] = set()
        self.data = 0
        self.acks = 0
        self.completed = False
        self.unreached = 0
        self.origin_crashed = False


@register_runner
class BroadcastRunner(OverlayRunner):
    name = "broadcast"
    schema = {
        "detector": OverlayRunner.schema["detector"],
        "overlay": overlay_table_without_lookups(),
        "broadcast": {
            "mode": Field("both", str, "best_effort, reliable, or both alternating", choices=MODES),
            "broadcasts": Field(10, int, "broadcasts started, one every interval_s", ge=1),
            "delay_s": Field(10.0, float, "first broadcast this long after the build settled", ge=0),
            "interval_s": Field(30.0, float, "time between broadcasts (>= window_s)", gt=0),
            "window_s": Field(30.0, float, "each broadcast is measured over this window", gt=0),
            "payload_bytes": Field(64, int, "size of each broadcast's payload", ge=0),
            **config_keys(
                SpreadConfig,
                ack_timeout_s=Tunable("reliable: a delegate must accept within this", gt=0),
                progress_interval_s=Tunable("reliable: a busy delegate reports progress this often", gt=0),
                progress_misses=Tunable("reliable: silent intervals before a delegate is replaced", ge=1),
                max_attempts=Tunable("reliable: contacts tried per block before it is given up", ge=1),
            ),
        },
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        b = scenario.values["broadcast"]
        if b["interval_s"] < b["window_s"]:
            raise scenario.error("broadcast.interval_s", f"must be >= broadcast.window_s ({b['window_s']:g}) "
                                 "so that broadcasts are measured one at a time")
        last_end = settled_at(scenario) + b["delay_s"] + (b["broadcasts"] - 1) * b["interval_s"] + b["window_s"]
        if scenario.values["duration_s"] < last_end:
            raise scenario.error("duration_s", f"must be >= {last_end:g}, when the last broadcast's window ends")

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        b = scenario.section("broadcast")
        self.broadcast_settings = b
        self.spread_config = config_from(b, SpreadConfig)
        self.payload = bytes(b["payload_bytes"])
        self.runs: list[_Run] = []
        self.by_id: dict[int, _Run] = {}
        self.active: _Run | None = None
        self.last_down: list[float | None] = [None] * len(sim.hosts)
        self.layer_counters = SummedCounters(COUNTERS, lambda core: _broadcast(core).counters)

    # -- nodes -----------------------------------------------------------------------------
    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        layer = Broadcast(overlay, self.sim.streams.fresh("broadcast", address, self.sim.hosts[address].incarnation + 1),
                          self.spread_config)
        return Stack([*self.below_overlay[address], overlay, layer])

    def on_down(self, address: int) -> None:
        self.layer_counters.harvest(self.sim.hosts[address].core)
        self.last_down[address] = self.sim.now
        super().on_down(address)

    # -- the workload ----------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        b = self.broadcast_settings
        first = self.store_at + b["delay_s"]
        for index in range(b["broadcasts"]):
            mode = b["mode"] if b["mode"] != "both" else ("best_effort", "reliable")[index % 2]
            at = first + index * b["interval_s"]
            run = _Run(index, mode, at, at + b["window_s"])
            self.runs.append(run)
            self.sim.engine.schedule(at, self._begin, run)
            self.sim.engine.schedule(run.end, self._end, run)

    def _begin(self, run: _Run) -> None:
        origin = self._random_live(joined_only=True)
        if origin is None:
            return
        run.origin = origin
        run.counters_at_start = self.layer_counters.totals(self.sim.hosts)
        run.nodes_at_start = sum(1 for a, h in enumerate(self.sim.hosts) if h.up and self.joined_at[a] is not None)
        self.active = run
        run.broadcast_id = self.sim.hosts[origin].call(partial(_start_broadcast, self.payload, run.mode == "reliable"))
        self.by_id[run.broadcast_id] = run
        run.reached.add(origin)

    def _end(self, run: _Run) -> None:
        if run.origin is None:
            return
        totals = self.layer_counters.totals(self.sim.hosts)
        data_key = "data_sent_reliable" if run.mode == "reliable" else "data_sent"
        run.data = totals[data_key] - run.counters_at_start[data_key]
        run.acks = totals["acks_sent"] - run.counters_at_start["acks_sent"]
        start = run.start
        for address, host in enumerate(self.sim.hosts):
            joined = self.joined_at[address]
            down = self.last_down[address]
            if host.up and joined is not None and joined <= start and (down is None or down < start):
                run.audience.add(address)
        down = self.last_down[run.origin]
        run.origin_crashed = down is not None and down >= start
        if self.active is run:
            self.active = None

    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is BroadcastDelivered:
            run = self.by_id.get(event.broadcast_id)
            if run is not None and self.sim.now <= run.end:
                run.reached.add(address)
                run.hops.append(event.hops)
                run.times.append(self.sim.now - run.start)
            return
        if kind is BroadcastCompleted:
            run = self.by_id.get(event.broadcast_id)
            if run is not None:
                run.completed = True
                run.unreached = event.unreached_blocks
            return
        super().on_event(address, event)

    # -- results ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        base = super().summary()
        nodes = len(self.sim.hosts)
        done = [run for run in self.runs if run.origin is not None and run.audience]
        out: dict[str, Any] = {
            "log2_n": round(math.log2(nodes), 3),
            "broadcasts": len(done),
            "coverage": rounded(min((_coverage(run) for run in done), default=None)),
        }
        per_node: list[float] = []
        for mode in ("best_effort", "reliable"):
            runs = [run for run in done if run.mode == mode]
            if not runs:
                continue
            audience = sum(len(run.audience) for run in runs)
            reached = sum(len(run.reached & run.audience) for run in runs)
            out[f"coverage_{mode}"] = rounded(reached / audience)
            out[f"coverage_{mode}_min"] = rounded(min(_coverage(run) for run in runs))
            messages = sum(run.data / run.nodes_at_start for run in runs) / len(runs)
            out[f"messages_per_node_{mode}"] = rounded(messages)
            per_node.append(messages)
            if mode == "reliable":
                kept = [run for run in runs if not run.origin_crashed]
                out["origin_crashed_reliable"] = len(runs) - len(kept)
                if kept:
                    out["coverage_reliable_origin_up"] = rounded(sum(len(run.reached & run.audience) for run in kept)
                                                                / sum(len(run.audience) for run in kept))
                out["acks_per_node_reliable"] = rounded(sum(run.acks / run.nodes_at_start for run in runs) / len(runs))
                out["completed_reliable"] = sum(run.completed for run in runs)
                out["unreached_blocks"] = sum(run.unreached for run in runs)
        out["messages_per_node"] = rounded(max(per_node)) if per_node else None
        hops = [h for run in done for h in run.hops]
        out["depth_max"] = max(hops) if hops else None
        out["depth_mean"] = rounded(sum(hops) / len(hops)) if hops else None
        last = sorted(max(run.times) for run in done if run.times)
        out["delivery_time_p99_s"] = rounded(percentile_of_sorted(sorted(t for run in done for t in run.times), 0.99))
        out["delivery_time_max_s"] = rounded(last[-1]) if last else None
        out["audience_median"] = sorted(len(run.audience) for run in done)[len(done) // 2] if done else None
        for key in ("contacts_median", "joins", "joins_failed", "build_done_s"):
            out[key] = base[key]
        return out


def settled_at(scenario: Scenario) -> float:
    """When the overlay runner's build has settled (its ``store_at``), from the scenario alone."""
    o = scenario.values["overlay"]
    built = (scenario.values["nodes"] - 1) * o["join_spacing_s"] if o["build"] == "join" else 0.0
    return built + o["settle_s"]


def _coverage(run: _Run) -> float:
    return len(run.reached & run.audience) / len(run.audience)


def _broadcast(core: Protocol) -> Broadcast:
    assert isinstance(core, Stack)
    return core.layer(Broadcast)


def _start_broadcast(payload: bytes, reliable: bool, core: Protocol, now: float) -> int:
    return _broadcast(core).broadcast(payload, now, reliable=reliable)
