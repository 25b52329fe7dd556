"""The ``deployment`` runner: services deployed on full nodes under churn, their availability measured.

The nodes are the ``node`` runner's (:mod:`p2pdeploy.sim.runners.node`): every layer of a
``p2pdeploy join`` node, the simulated executor serving their replicas, each node's uptime
history advertised as its ``availability``. On top of them:

1. **deploy** (from ``deployment.deploy_at_s``, spread over ``deploy_window_s``): random live
   nodes deploy ``deployment.services`` services, each with its own key (the service
   ``svcNNN@KEY`` is that node's), through their :class:`~p2pdeploy.collective.deployment.Deployment`
   layer. A share ``fixed_share`` of them ask for a fixed count drawn from ``fixed_min ..
   fixed_max``; the others for an availability target drawn in turn from ``targets``, the
   deployer choosing between ``min_replicas`` and ``max_replicas`` from the candidates' uptime.
   Every node trusts any key (``trusted_keys = "any"``, an open community), so any node may
   manage any service and start its replicas anywhere. A deploy that fails, or whose node goes
   down before it ends, is tried again from another node (``deploy_retries`` times).
2. **churn** from ``churn.start_s``, as the persistence runner decides it (a departure loses
   the disk with ``persistence.permanent_departures``; otherwise the node comes back with its
   store, and so with the service records its acceptors hold). A node that comes back hosts no
   replica: its processes died with it.

What is measured, by ground truth, not by what the managers believe:

- a service's **availability**: the share of samples (every ``sample_interval_s``, from
  ``warmup_s`` after the deploy window to the end) at which at least one replica of it is
  running and healthy on a live node (the live nodes' ``ReplicaHost`` statuses);
- a **replacement time**: from the moment a node that ran a running replica of a service went
  down to the moment a new replica of that service (one never seen running before) reached
  running, matched oldest loss first;
- a **false replacement**: a manager's ``lost`` decision about a replica whose host was up and
  still had it (the replacement it starts is for nothing);
- **desired state lost**: services (deployed, not undeployed) whose record fewer than a majority
  of its group still hold on a disk that exists (live or down but coming back): nobody can read
  it any more; or that at the end no live node manages while a member of its record's group is
  up (a member could manage it and does not). A service whose group members are all down at the
  end is not lost (they come back with their disks): ``services_unmanaged_end`` counts those too.

Summary keys: ``availability_median``, ``availability_p10``, ``availability_by_target`` (target
-> the median availability of the services with it; ``"fixed"`` for fixed counts),
``replicas_mean`` (desired replicas, sampled while a manager was live, mean over services),
``replicas_by_target``, ``replacement_s_median``, ``replacement_s_p95``, ``replacements``,
``losses`` and ``losses_unreplaced``, ``desired_state_lost`` (with ``records_lost_for_good`` and
``services_unmanaged_end``), ``unmanaged_share`` (the share of samples a service had no live
manager, mean over services; ``unmanaged_group_up_share``: of those, while a member of its
record's group was up, so could have managed it), ``false_replacements``, ``services_deployed``, ``decisions`` (a
mapping: decision -> count), beside the node runner's. With ``--out``, ``services.csv`` has one
line per service.

Every node starts with ``prior_history_s`` of uptime history before time 0, drawn from the
churn's own session and downtime lengths, as a real node's 30-day history would be: without
it every node would advertise an availability of 1 until it first went down (a minute of
history suffices to advertise), and the deployer would place one replica for any target.

The ``[deployment]`` defaults scale the layer's periods for a WAN (as ``[detector]`` uses a 5 s
protocol period): a tick every 2 s, reports every 10 s, a new manager waits 15 s for reports.
The persistence and overlay workloads of the node runner are off unless the scenario asks.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections import Counter, deque
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.deployment import LIVE_STATES, DeployFinished, Deployment, DeploymentConfig
from p2pdeploy.collective.deployment_messages import Decision, ServiceId
from p2pdeploy.collective.persistence import PersistenceConfig
from p2pdeploy.collective.records import majority
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaState, ReplicaStateChanged
from p2pdeploy.resource.bundle import Bundle, pack_files
from p2pdeploy.sim.churn import LengthDistribution
from p2pdeploy.sim.runner import register_runner
from p2pdeploy.sim.runners.node import NodeRunner
from p2pdeploy.sim.schema import Field, Section, Tunable, config_from, config_keys, show

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation


@dataclasses.dataclass(frozen=True)
class FloatList(Field):
    """A key whose value is a non-empty list of numbers, each within the range."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list | tuple) or not value:
            return "must be a non-empty list of numbers, e.g. [0.99, 0.999]"
        for item in value:
            problem = Field(0.0, float, "").problem(item)
            if problem is None and self.gt is not None and item <= self.gt:
                problem = f"must be > {self.gt:g}"
            if problem is None and self.le is not None and item >= self.le:
                problem = f"must be < {self.le:g}"
            if problem is not None:
                return f"must hold numbers that each {problem.removeprefix('must ')} ({show(item)} does not)"
        return None


def _with_defaults(section: Section, **values: Any) -> Section:
    """``section`` with the defaults of some of its fields changed."""
    out = dict(section)
    for name, value in values.items():
        spec = out[name]
        assert isinstance(spec, Field)
        out[name] = dataclasses.replace(spec, default=value)
    return out


#: The node runner's workloads (values, lookups, blobs, prospects), off unless a scenario asks.
_QUIET = {"overlay": {"values": 0, "gets": 0, "lookups": 0},
          "persistence": {"blobs": 0, "compare_replicas": False, "fetch_window_s": 0.0},
          "node": {"prospects": 0}}


def _quiet(name: str) -> Section:
    return _with_defaults(NodeRunner.schema[name], **_QUIET[name])  # type: ignore[arg-type]


@register_runner
class DeploymentRunner(NodeRunner):
    name = "deployment"
    schema = {
        **NodeRunner.schema,
        "overlay": _quiet("overlay"),
        "persistence": {
            **_quiet("persistence"),
            **config_keys(PersistenceConfig, quorum_replicas=Tunable(
                "members of a quorum record's group (a service's record: its desired state)", ge=1, le=16)),
        },
        "node": _quiet("node"),
        "deployment": {
            **_with_defaults(config_keys(
                DeploymentConfig,
                tick_s=Tunable("seconds between two reconciliations of every managed service", gt=0),
                report_interval_s=Tunable("seconds between two reports of a host to a manager", gt=0),
                report_misses=Tunable("reports without an ack before a host reports to the next member", ge=1),
                takeover_grace_s=Tunable("a new manager places nothing this long (it waits for reports)", gt=0),
                record_refresh_s=Tunable("seconds between two quorum reads of a managed record", gt=0),
                unhealthy_grace_s=Tunable("a replica failed or unhealthy this long is replaced", ge=0),
                start_timeout_s=Tunable("a start not reported within this is given up", gt=0),
                pending_retry_s=Tunable("while replicas are missing and no node has room, seconds "
                                        "between two searches", gt=0),
                refresh_candidates_s=Tunable("seconds between two recomputations of a target's count", gt=0),
                unknown_availability=Tunable("the availability assumed of a node that advertises none",
                                             ge=0, le=1),
                manager_suspect_s=Tunable("a group member suspected this long counts as gone when choosing "
                                          "the manager", gt=0),
            ), tick_s=2.0, report_interval_s=10.0, takeover_grace_s=15.0, pending_retry_s=10.0,
                manager_suspect_s=120.0),
            "services": Field(50, int, "services deployed", ge=0),
            "targets": FloatList((0.99, 0.999), list, "availability targets, given in turn to the services "
                                 "without a fixed count", gt=0, le=1),
            "fixed_share": Field(0.3, float, "share of the services with a fixed replica count", ge=0, le=1),
            "fixed_min": Field(1, int, "smallest fixed count drawn", ge=1, le=64),
            "fixed_max": Field(3, int, "largest fixed count drawn", ge=1, le=64),
            "min_replicas": Field(1, int, "placement.min_replicas of a service with a target", ge=1, le=64),
            "max_replicas": Field(10, int, "placement.max_replicas of a service with a target", ge=1, le=64),
            "service_cpu": Field(0.25, float, "cores each replica reserves", gt=0),
            "deploy_at_s": Field(120.0, float, "the deploys start (after the network is built)", ge=0),
            "deploy_window_s": Field(60.0, float, "the deploys are spread over this window", ge=0),
            "deploy_retries": Field(3, int, "a failed deploy is tried again from another node this often", ge=0),
            "retry_after_s": Field(30.0, float, "seconds before a failed deploy is tried again", gt=0),
            "warmup_s": Field(300.0, float, "availability is measured from this long after the deploy window",
                              ge=0),
            "sample_interval_s": Field(10.0, float, "seconds between two availability samples", gt=0),
            "prior_history_s": Field(7 * 86400.0, float, "every node starts with this much uptime history "
                                     "before time 0, drawn from [churn]'s session and downtime lengths (a "
                                     "community that existed before the run); 0: none, every node looks "
                                     "always up until it first goes down", ge=0),
        },
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        d = scenario.values["deployment"]
        if d["fixed_min"] > d["fixed_max"]:
            raise scenario.error("deployment.fixed_min", f"must be <= deployment.fixed_max ({d['fixed_max']})")
        if d["min_replicas"] > d["max_replicas"]:
            raise scenario.error("deployment.min_replicas", f"must be <= deployment.max_replicas ({d['max_replicas']})")
        o = scenario.values["overlay"]
        built = (scenario.values["nodes"] - 1) * o["join_spacing_s"] if o["build"] == "join" else 0.0
        if d["services"] and d["deploy_at_s"] < built:
            raise scenario.error("deployment.deploy_at_s", f"must be >= {built:g} (the network is built then)")
        if d["services"] and d["deploy_at_s"] + d["deploy_window_s"] + d["warmup_s"] >= scenario.values["duration_s"]:
            raise scenario.error("deployment.warmup_s", "must end before duration_s (nothing would be measured)")

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        d = scenario.section("deployment")
        self.d = d
        self.deployment_config = config_from(d, DeploymentConfig)
        # an open community: any node may manage any service and start its replicas anywhere
        self.contributions = [dataclasses.replace(c, trusted_keys="any") for c in self.contributions]
        if d["prior_history_s"] and scenario.values["churn"]["model"] == "sessions":
            self._prior_histories(d["prior_history_s"])
        draw = sim.streams.get("deployment-services")
        fixed = round(d["services"] * d["fixed_share"])
        kinds = [True] * fixed + [False] * (d["services"] - fixed)
        draw.shuffle(kinds)
        targets = list(d["targets"])
        #: Per service: (name, fixed count or None, target or None).
        self.services: list[tuple[str, int | None, float | None]] = []
        next_target = 0
        for index, is_fixed in enumerate(kinds):
            if is_fixed:
                self.services.append((f"svc{index:03d}", draw.randint(d["fixed_min"], d["fixed_max"]), None))
            else:
                self.services.append((f"svc{index:03d}", None, targets[next_target % len(targets)]))
                next_target += 1
        self.index_of = {name: index for index, (name, _, _) in enumerate(self.services)}
        #: Service index -> its key, once deployed.
        self.keys: dict[int, int] = {}
        self.key_index: dict[int, int] = {}
        self.versions: dict[int, int] = {}
        self.deploy_ops: dict[tuple[int, int], tuple[int, int]] = {}  # (address, op) -> (service, attempt)
        self.deploy_failures: list[str] = []
        self._calling: int | None = None
        self._early: list[DeployFinished] = []
        self.measure_from = d["deploy_at_s"] + d["deploy_window_s"] + d["warmup_s"]
        self.samples = 0
        self.up_samples = [0] * len(self.services)
        self.managed_samples = [0] * len(self.services)
        self.desired_sum = [0] * len(self.services)
        #: Samples at which nobody managed the service though a member of its group was up.
        self.unmanaged_group_up = [0] * len(self.services)
        self._groups: dict[int, list[Any]] = {}
        #: Service index -> when a node running a running replica of it went down (oldest first).
        self.losses: dict[int, deque[float]] = {}
        self.loss_count = 0
        self.replacement_s: list[float] = []
        #: (service, when a replica was lost with its host, when its replacement ran, which one).
        self.replaced: list[tuple[int, float, float, str]] = []
        self.seen_running: set[str] = set()
        self.decisions: Counter[str] = Counter()
        self.false_replacements = 0
        self.false_examples: list[tuple[float, str, str]] = []

    def _prior_histories(self, span_s: float) -> None:
        """Each node's uptime history before time 0: alternating sessions and downtimes drawn
        from the churn's distributions, back from a downtime that ends at 0 (the node starts then)."""
        churn = self.scenario.values["churn"]
        session = LengthDistribution(churn["session"]["distribution"], churn["session"]["median_s"],
                                     churn["session"]["shape"])
        downtime = LengthDistribution(churn["downtime"]["distribution"], churn["downtime"]["median_s"],
                                      churn["downtime"]["shape"])
        draw = self.sim.streams.get("deployment-prior-history")
        for history in self.uptime:
            spans = []
            end = -downtime.sample(draw)
            while end > -span_s:
                start = max(-span_s, end - session.sample(draw))
                spans.append((start, end))
                end = start - downtime.sample(draw)
            for start, end in reversed(spans):
                history.begin(start)
                history.end(end)

    def start(self) -> None:
        super().start()
        d = self.d
        engine = self.sim.engine
        draw = self.sim.streams.get("deployment-deploys")
        for index in range(len(self.services)):
            engine.schedule(d["deploy_at_s"] + draw.uniform(0, d["deploy_window_s"]), self._deploy, index, 0)
        if self.services:
            engine.schedule(self.measure_from, self._sample_availability)

    # -- deploying -------------------------------------------------------------------------
    def _deploy(self, index: int, attempt: int) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            self._retry(index, attempt, "no live node")
            return
        name, count, target = self.services[index]
        d = self.d
        placement = (f"replicas = {count}" if count is not None else
                     f"availability = {target}\nmin_replicas = {d['min_replicas']}\nmax_replicas = {d['max_replicas']}")
        self._calling, self._early = address, []
        try:
            op = self.sim.hosts[address].call(partial(_deploy, name, placement, d["service_cpu"]))
        finally:
            self._calling = None
        self.deploy_ops[(address, op)] = (index, attempt)
        for event in self._early:
            self.on_event(address, event)

    def _retry(self, index: int, attempt: int, reason: str) -> None:
        self.deploy_failures.append(f"{self.services[index][0]} (attempt {attempt + 1}): {reason}")
        if attempt < self.d["deploy_retries"]:
            self.sim.engine.schedule(self.sim.now + self.d["retry_after_s"], self._deploy, index, attempt + 1)

    def _deployed(self, address: int, event: DeployFinished) -> None:
        entry = self.deploy_ops.pop((address, event.op_id), None)
        if entry is None:
            return
        index, attempt = entry
        if not event.ok:
            self._retry(index, attempt, event.reason)
            return
        stack = self.stacks[address]
        assert stack is not None
        key = ServiceId(self.services[index][0], stack.layer(Deployment).identity.public_key).key
        self.keys[index] = key
        self.key_index[key] = index
        self.versions[index] = event.version

    # -- churn -----------------------------------------------------------------------------
    def _go_down(self, address: int, permanent: bool) -> None:
        host = self.sim.hosts[address]
        stack = self.stacks[address]
        if host.up and stack is not None:
            now = self.sim.now
            for status in stack.layer(ReplicaHost).statuses():
                index = self.index_of.get(_service_of(status.replica_id))
                if index is not None and status.state is ReplicaState.RUNNING:
                    self.losses.setdefault(index, deque()).append(now)
                    self.loss_count += 1
            for key in [k for k in self.deploy_ops if k[0] == address]:
                index, attempt = self.deploy_ops.pop(key)
                self._retry(index, attempt, "the deploying node went down")
        super()._go_down(address, permanent)

    # -- events ----------------------------------------------------------------------------
    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is ReplicaStateChanged:
            if event.new is ReplicaState.RUNNING and event.replica_id not in self.seen_running:
                self.seen_running.add(event.replica_id)
                index = self.index_of.get(_service_of(event.replica_id))
                losses = self.losses.get(index) if index is not None else None
                if losses:
                    lost_at = losses.popleft()
                    self.replacement_s.append(self.sim.now - lost_at)
                    self.replaced.append((index, lost_at, self.sim.now, event.replica_id))
            return
        if kind is Decision:
            self.decisions[event.decision] += 1
            if event.decision == "lost" and self._still_there(event.host, event.replica_id):
                self.false_replacements += 1
                if len(self.false_examples) < 20:
                    self.false_examples.append((self.sim.now, event.replica_id, event.reason))
            return
        if kind is DeployFinished:
            if self._calling == address and (address, event.op_id) not in self.deploy_ops:
                self._early.append(event)
            else:
                self._deployed(address, event)
            return
        super().on_event(address, event)

    def _still_there(self, node_id: int, replica_id: str) -> bool:
        """Whether the node ``node_id`` is up and still has ``replica_id`` in a live state."""
        address = self.address_of.get(node_id)
        if address is None or not self.sim.hosts[address].up:
            return False
        stack = self.stacks[address]
        status = stack.layer(ReplicaHost).status(replica_id) if stack is not None else None
        return status is not None and status.state.value in LIVE_STATES

    # -- measuring -------------------------------------------------------------------------
    def _sample_availability(self) -> None:
        up: set[int] = set()
        desired: dict[int, int] = {}
        for address, stack in enumerate(self.stacks):
            if stack is None or not self.sim.hosts[address].up:
                continue
            for status in stack.layer(ReplicaHost).statuses():
                if status.state is ReplicaState.RUNNING and status.healthy:
                    index = self.index_of.get(_service_of(status.replica_id))
                    if index is not None:
                        up.add(index)
            for key, manager in stack.layer(Deployment).managers.items():
                index = self.key_index.get(key)
                if index is not None:
                    desired[index] = max(desired.get(index, 0), manager.desired)
        self.samples += 1
        for index in self.keys:
            if index in up:
                self.up_samples[index] += 1
            if index in desired:
                self.managed_samples[index] += 1
                self.desired_sum[index] += desired[index]
            elif self._group_members_up(index):
                self.unmanaged_group_up[index] += 1
        self.sim.engine.schedule(self.sim.now + self.d["sample_interval_s"], self._sample_availability)

    def group_of(self, index: int) -> list[Any]:
        """The group of the service's record (as its acceptors hold it), once known."""
        group = self._groups.get(index)
        if group is None:
            key = self.keys[index]
            for store in self.stores:
                state = store.read_acceptor(key)
                if state is not None and state.group:
                    group = self._groups[index] = list(state.group)
                    break
        return group or []

    def _group_members_up(self, index: int) -> int:
        hosts = self.sim.hosts
        return sum(1 for member in self.group_of(index)
                   if (a := self.address_of.get(member.node_id)) is not None and hosts[a].up)

    def _availability(self, index: int) -> float | None:
        return self.up_samples[index] / self.samples if self.samples and index in self.keys else None

    def _records_lost_for_good(self) -> set[int]:
        """Deployed services whose record fewer than a majority of its group still hold (on any
        disk that exists, up or down)."""
        holders: Counter[int] = Counter()
        group_size: dict[int, int] = {}
        for store in self.stores:
            for key in store.acceptor_keys():
                index = self.key_index.get(key)
                if index is None:
                    continue
                state = store.read_acceptor(key)
                if state is not None and state.item is not None and state.item.sequence >= self.versions[index]:
                    holders[index] += 1
                    group_size[index] = max(group_size.get(index, 0), len(state.group))
        return {index for index in self.keys
                if holders[index] < majority(group_size.get(index, self.pconfig.quorum_replicas))}

    def _managed_now(self) -> set[int]:
        managed: set[int] = set()
        for address, stack in enumerate(self.stacks):
            if stack is not None and self.sim.hosts[address].up:
                managed.update(self.key_index[k] for k, m in stack.layer(Deployment).managers.items()
                               if k in self.key_index and m.desired > 0)
        return managed

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        deployed = sorted(self.keys)
        measured = [a for a in (self._availability(i) for i in deployed) if a is not None]
        by_target: dict[str, list[float]] = {}
        replicas_by: dict[str, list[float]] = {}
        means = []
        for index in deployed:
            _, count, target = self.services[index]
            label = "fixed" if count is not None else f"{target:g}"
            availability = self._availability(index)
            if availability is not None:
                by_target.setdefault(label, []).append(availability)
            if self.managed_samples[index]:
                mean = self.desired_sum[index] / self.managed_samples[index]
                means.append(mean)
                replicas_by.setdefault(label, []).append(mean)
        lost_for_good = self._records_lost_for_good()
        unmanaged = set(deployed) - self._managed_now()
        unmanaged_member_up = {index for index in unmanaged if self._group_members_up(index)}
        times = sorted(self.replacement_s)
        out.update({
            "services_deployed": len(deployed),
            "deploy_failures": len(self.deploy_failures),
            "availability_median": _round(statistics.median(measured)) if measured else None,
            "availability_p10": _round(_percentile(sorted(measured), 0.10)) if measured else None,
            "availability_min": _round(min(measured)) if measured else None,
            "availability_by_target": {label: _round(statistics.median(values))
                                       for label, values in sorted(by_target.items())},
            "replicas_mean": round(statistics.fmean(means), 3) if means else None,
            "replicas_by_target": {label: round(statistics.fmean(values), 3)
                                   for label, values in sorted(replicas_by.items())},
            "replacement_s_median": round(statistics.median(times), 3) if times else None,
            "replacement_s_p95": round(_percentile(times, 0.95), 3) if times else None,
            "replacements": len(times),
            "losses": self.loss_count,
            "losses_unreplaced": sum(len(q) for q in self.losses.values()),
            "desired_state_lost": len(lost_for_good | unmanaged_member_up),
            "records_lost_for_good": len(lost_for_good),
            "services_unmanaged_end": len(unmanaged),
            "unmanaged_share": round(statistics.fmean(
                1 - self.managed_samples[i] / self.samples for i in deployed), 6) if self.samples and deployed
            else None,
            "unmanaged_group_up_share": round(statistics.fmean(
                self.unmanaged_group_up[i] / self.samples for i in deployed), 6) if self.samples and deployed
            else None,
            "false_replacements": self.false_replacements,
            "decisions": dict(sorted(self.decisions.items())),
            "availability_samples": self.samples,
        })
        return out

    def write(self, out_dir: Path) -> list[Path]:
        path = out_dir / "services.csv"
        lost = self._records_lost_for_good()
        managed = self._managed_now()
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["service", "fixed_count", "target", "deployed", "availability", "desired_mean",
                             "managed_share", "unmanaged_group_up_share", "losses_unreplaced", "record_lost",
                             "managed_at_end"])
            for index, (name, count, target) in enumerate(self.services):
                samples = self.managed_samples[index]
                writer.writerow([name, count or "", target or "", int(index in self.keys),
                                 _round(self._availability(index)),
                                 round(self.desired_sum[index] / samples, 3) if samples else "",
                                 round(samples / self.samples, 6) if self.samples else "",
                                 round(self.unmanaged_group_up[index] / self.samples, 6) if self.samples else "",
                                 len(self.losses.get(index, ())), int(index in lost), int(index in managed)])
        return [*super().write(out_dir), path]


def _service_of(replica_id: str) -> str:
    return replica_id.rsplit("-", 1)[0]


def _percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of a sorted list."""
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _deploy(name: str, placement: str, cpu: float, core: Protocol, now: float) -> int:
    """Deploy the service ``name`` from this node, signed with its key (its owner)."""
    assert isinstance(core, Stack)
    deployment = core.layer(Deployment)
    manifest = (f'name = "{name}"\nversion = "1.0"\ncommand = ["python3", "app.py"]\n'
                f'[resources]\ncpu = {cpu}\nmemory = "64M"\ndisk = "1M"\n'
                f'[placement]\n{placement}\n').encode()
    bundle = Bundle.parse(pack_files({"manifest.toml": manifest, "app.py": b"print(1)\n"})).sign(deployment.identity)
    return deployment.deploy(bundle, manifest, now)
