"""The ``prospector`` runner: aggregation trees and prospect queries over the Kademlia overlay.

Every node hosts a :class:`~p2pdeploy.core.Stack` of the overlay and a
:class:`~p2pdeploy.collective.prospector.Prospector`. The network is built by the ``overlay``
runner (``overlay.build = "oracle"`` for 10^4 nodes, ``"join"`` for a real bootstrap; its churn
hooks apply), so this runner only adds:

- **attributes**: each machine draws heterogeneous resources from its own seeded stream
  (``attributes``, by address; a machine that comes back after churn is the same machine): cores, memory, disk and how much of each is free, os, arch, python,
  owner (Zipf over ``owners``), region, tags, uptime. They are described with the resource
  layer's :func:`~p2pdeploy.resource.description.node_attributes` (machine, contribution, free).
- **checks** every ``check_interval_s``: the COUNT and SUM (of ``sum_attribute``) held by the
  true root (the live, joined node closest to the tree's key) against the truth over the live
  nodes.
  ``convergence_s`` is the first check after which every check was exact (static runs);
  under churn the errors after ``measure_from_s`` are summarised (median, p99, max).
- **aggregates**: ``aggregates`` COUNT queries from random live nodes, answered by the root,
  compared with the live count when the answer arrives.
- **prospects**: ``prospects`` queries for ``prospect_n`` nodes from random live nodes, each with
  a requirement drawn from ``requirements`` (separated by ``;``), checked against the ground
  truth: the nodes that match and were live both when the query started and when it finished.
  A prospect *succeeds* when it returns only live matching nodes, and at least
  min(n, matches) of them. ``prospect_messages`` counts every message a query caused.
"""

from __future__ import annotations

import bisect
import math
import statistics
from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.prospector import (
    AggregateFinished,
    ProspectFinished,
    Prospector,
    ProspectorConfig,
)
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.fabric.admission import Free
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.units import GIB, MIB
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.resource.description import node_attributes
from p2pdeploy.resource.requirements import ParseError, Requirement
from p2pdeploy.sim.metrics import percentile_of_sorted, ratio, rounded
from p2pdeploy.sim.runner import register_runner
from p2pdeploy.sim.runners.overlay import OverlayRunner, overlay_table_without_lookups
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys

if TYPE_CHECKING:
    import random

    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation

DEFAULT_REQUIREMENTS = "; ".join((
    'cpu_free >= 1 and memory_free >= 512M and os == "linux"',
    'memory_free >= 16G and arch == "aarch64" and not owner == "owner-0"',
    '"gpu" in tags and region in {"eu-west", "eu-central"}',
    'disk_free >= 200G and "ssd" in tags and uptime >= 604800',
    'os == "freebsd" and cores >= 8',
    'cores >= 32 and "public-ip" in tags and os != "windows"',
    'os == "freebsd" and arch == "riscv64"',
    'os == "freebsd" and arch == "riscv64" and "ipv6" in tags',
))  # fmt: skip

_OS = (("linux", 0.72), ("darwin", 0.14), ("windows", 0.09), ("freebsd", 0.05))
_ARCH = (("x86_64", 0.70), ("aarch64", 0.27), ("riscv64", 0.03))
_REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "sa-east", "ap-south", "ap-northeast", "af-south")
_CORES = ((1, 0.10), (2, 0.22), (4, 0.30), (8, 0.22), (16, 0.10), (32, 0.04), (64, 0.02))
_MEMORY_GIB = ((1, 0.08), (2, 0.14), (4, 0.24), (8, 0.24), (16, 0.16), (32, 0.08), (64, 0.04), (128, 0.02))
_TAGS = (("ssd", 0.6), ("gpu", 0.05), ("ipv6", 0.4), ("public-ip", 0.2), ("battery", 0.1), ("fast-net", 0.15))
_PYTHON = (("3.11", 0.6), ("3.12", 0.4))


def _weighted(rng: random.Random, table: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([value for value, _ in table], [weight for _, weight in table])[0]


def machine_attributes(rng: random.Random, owners: int) -> dict[str, Any]:
    """One machine's attributes, drawn from its own stream ``rng``."""
    cores = _weighted(rng, _CORES)
    memory_total = _weighted(rng, _MEMORY_GIB) * GIB
    disk_total = rng.choice((32, 64, 128, 256, 512, 1024, 2048)) * GIB
    machine = Machine(
        cores=cores,
        memory_total_bytes=memory_total,
        memory_free_bytes=memory_total * rng.randint(2, 16) // 16,
        disk_total_bytes=disk_total,
        disk_free_bytes=disk_total * rng.randint(1, 16) // 16,
        load_1m=round(rng.uniform(0, cores), 2),
        os=_weighted(rng, _OS),
        arch=_weighted(rng, _ARCH),
        python=_weighted(rng, _PYTHON),
    )
    weights = [1 / (rank + 1) for rank in range(owners)]
    owner = f"owner-{rng.choices(range(owners), weights)[0]}"
    tags = frozenset(tag for tag, p in _TAGS if rng.random() < p)
    share = rng.choice((0.25, 0.5, 0.75, 1.0))
    contribution = Contribution(
        cpu_cores=max(0.5, cores * share),
        memory_bytes=machine.memory_free_bytes * rng.randint(4, 16) // 16 // MIB * MIB,
        disk_bytes=machine.disk_free_bytes * rng.randint(4, 16) // 16 // MIB * MIB,
        max_services=rng.randint(1, 8),
        tags=tags,
        owner=owner,
    )
    used = rng.randint(0, 3) / 4  # what the node's replicas already hold
    free = Free(
        cpu_cores=contribution.cpu_cores * (1 - used),
        memory_bytes=int(contribution.memory_bytes * (1 - used)) // MIB * MIB,
        disk_bytes=int(contribution.disk_bytes * (1 - used)) // MIB * MIB,
        bandwidth_bps=None,
        services=max(0, contribution.max_services - round(used * contribution.max_services)),
    )
    region = rng.choice(_REGIONS)
    uptime = round(rng.lognormvariate(math.log(86400.0), 1.5))  # observed typical uptime, seconds
    return node_attributes(contribution, free, machine, region=region, uptime=uptime)


@register_runner
class ProspectorRunner(OverlayRunner):
    name = "prospector"
    schema = {
        "detector": OverlayRunner.schema["detector"],
        "overlay": overlay_table_without_lookups(),
        "prospector": {
            **config_keys(
                ProspectorConfig,
                tree=Tunable("the tree's name; its root is the node closest to its key"),
                update_interval_s=Tunable("heartbeat: a node refreshes its parent at least this often", gt=0),
                min_update_interval_s=Tunable("rate bound: at most one update per this interval", gt=0),
                expiry_s=Tunable("a child's contribution expires when not refreshed this long", gt=0),
                ack_timeout_s=Tunable("an update not acked in this time is sent again", gt=0),
                update_tries=Tunable("sends of an update before its parent is suspected", ge=1),
                suspect_s=Tunable("how long a parent that did not ack is avoided", gt=0),
                rpc_timeout_s=Tunable("a prospect visit's timeout", gt=0),
                root_timeout_s=Tunable("timeout of a request routed to the root", gt=0),
                alpha=Tunable("prospect visits in flight at once", ge=1),
                max_visits=Tunable("a prospect's budget of visits", ge=1),
                verify_candidates=Tunable("visit candidates offered by their parents before returning them"),
                max_distinct=Tunable("distinct strings listed per attribute in a summary", ge=1),
                top_k=Tunable("TOP-K entries per top attribute", ge=0),
            ),
            "owners": Field(40, int, "owners of the machines (Zipf-distributed)", ge=1),
            "check_interval_s": Field(1.0, float, "how often the root's COUNT and SUM are checked", gt=0),
            "sum_attribute": Field("memory_free", str, "the attribute whose SUM is checked"),
            "measure_from_s": Field(0.0, float, "errors after this time are summarised (a warm-up before it)",
                                    ge=0),
            "aggregates": Field(50, int, "COUNT queries from random live nodes", ge=0),
            "prospects": Field(200, int, "prospect queries from random live nodes", ge=0),
            "prospect_n": Field(5, int, "nodes each prospect asks for", ge=1),
            "requirements": Field(DEFAULT_REQUIREMENTS, str, "requirements prospects draw from, separated by ;"),
            "queries_at_s": Field(30.0, float, "queries start at this time", ge=0),
            "queries_window_s": Field(60.0, float, "queries are spread over this window", ge=0),
        },
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        s = scenario.values["prospector"]
        try:
            config_from(s, ProspectorConfig)
        except ValueError as exc:
            raise scenario.error("prospector", str(exc)) from None
        texts = [t.strip() for t in s["requirements"].split(";") if t.strip()]
        if s["prospects"] and not texts:
            raise scenario.error("prospector.requirements", "must hold at least one requirement for prospects")
        for text in texts:
            try:
                Requirement.parse(text)
            except ParseError as exc:
                raise scenario.error("prospector.requirements", f"has a bad requirement {text!r}: {exc}") from None

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        s = scenario.section("prospector")
        self.p = s
        self.prospector_config = config_from(s, ProspectorConfig)
        nodes = len(sim.hosts)
        self.prospectors: list[Prospector | None] = [None] * nodes
        streams = sim.streams
        self.attributes = [
            machine_attributes(streams.fresh("attributes", address), s["owners"])
            for address in range(nodes)
        ]
        self.requirements = [Requirement.parse(t.strip()) for t in s["requirements"].split(";") if t.strip()]
        # attributes are fixed per machine, so each requirement's matches are computed once
        self.matching = [
            frozenset(a for a in range(nodes) if req.evaluate(self.attributes[a])) for req in self.requirements
        ]
        key = self.prospector_config.key
        self.by_distance = sorted(range(nodes), key=lambda a: self.node_ids[a] ^ key)
        self.query_rng = streams.get("prospector-queries")
        self.checks: list[tuple[float, int, int, float, float]] = []  # time, live, root count, count err, sum err
        self.pending_queries: dict[tuple[int, int], tuple[Any, ...]] = {}
        self.prospect_results: list[dict[str, Any]] = []
        self.aggregate_results: list[tuple[bool, float | None]] = []  # ok, relative error
        self.queries_abandoned = 0

    # -- building --------------------------------------------------------------------------
    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        host = self.sim.hosts[address]
        rng = self.sim.streams.fresh("prospector", address, host.incarnation + 1)
        prospector = Prospector(overlay, address, rng, self.prospector_config, self.attributes[address])
        prospector.start(self.sim.now)
        self.prospectors[address] = prospector
        return Stack([*self.below_overlay[address], overlay, prospector])

    def start(self) -> None:
        super().start()
        s = self.p
        engine = self.sim.engine
        engine.schedule(s["check_interval_s"], self._check)
        for _ in range(s["aggregates"]):
            engine.schedule(s["queries_at_s"] + self.query_rng.uniform(0, s["queries_window_s"]), self._aggregate)
        for _ in range(s["prospects"]):
            engine.schedule(s["queries_at_s"] + self.query_rng.uniform(0, s["queries_window_s"]), self._prospect)

    def on_down(self, address: int) -> None:
        self.prospectors[address] = None
        for key in [key for key in self.pending_queries if key[0] == address]:
            del self.pending_queries[key]
            self.queries_abandoned += 1
        super().on_down(address)

    # -- checks ----------------------------------------------------------------------------
    def true_root(self) -> int | None:
        """The live node closest to the tree's key among those that finished joining the overlay
        (before that, nobody can find it)."""
        hosts = self.sim.hosts
        for address in self.by_distance:
            if hosts[address].up and self.joined_at[address] is not None:
                return address
        return None

    def _check(self) -> None:
        s = self.p
        root = self.true_root()
        if root is not None:
            live = [a for a, host in enumerate(self.sim.hosts) if host.up]
            prospector = self.prospectors[root]
            assert prospector is not None
            summary = prospector.summary()
            name = s["sum_attribute"]
            true_sum = sum(self.attributes[a].get(name, 0) for a in live
                           if isinstance(self.attributes[a].get(name), int | float))
            stats = summary.numbers.get(name)
            got_sum = stats.total if stats is not None else 0
            count_error = abs(summary.nodes - len(live)) / len(live)
            sum_error = abs(got_sum - true_sum) / true_sum if true_sum else float(got_sum != 0)
            self.checks.append((self.sim.now, len(live), summary.nodes, count_error, sum_error))
        if self.sim.now + s["check_interval_s"] < self.scenario.values["duration_s"]:
            self.sim.engine.schedule(self.sim.now + s["check_interval_s"], self._check)

    # -- queries ---------------------------------------------------------------------------
    def _live_address(self) -> int | None:
        hosts = self.sim.hosts
        for _ in range(64):
            address = self.query_rng.randrange(len(hosts))
            if hosts[address].up and self.joined_at[address] is not None:
                return address
        return None

    def _aggregate(self) -> None:
        address = self._live_address()
        if address is None:
            return
        query = self.sim.hosts[address].call(partial(_aggregate_count))
        self.pending_queries[(address, query)] = ("aggregate",)

    def _prospect(self) -> None:
        address = self._live_address()
        if address is None:
            return
        index = self.query_rng.randrange(len(self.requirements))
        hosts = self.sim.hosts
        live_matches = frozenset(a for a in self.matching[index] if hosts[a].up)
        query = hosts[address].call(partial(_prospect, self.requirements[index], self.p["prospect_n"]))
        self.pending_queries[(address, query)] = ("prospect", index, live_matches, self.sim.now)

    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is not ProspectFinished and kind is not AggregateFinished:
            super().on_event(address, event)
            return
        what = self.pending_queries.pop((address, event.query_id), None)
        if what is None:
            return
        hosts = self.sim.hosts
        if kind is AggregateFinished:
            live = sum(1 for host in hosts if host.up)
            error = abs(event.value - live) / live if event.ok and event.value is not None else None
            self.aggregate_results.append((event.ok, error))
            return
        _, index, matches_at_start, started = what
        matches = frozenset(a for a in matches_at_start if hosts[a].up)
        returned = [f.contact.address for f in event.nodes]
        only_matching = all(a in self.matching[index] and hosts[a].up for a in returned)
        expected = min(event.n, len(matches))
        self.prospect_results.append({
            "index": index,
            "matches": len(matches),
            "returned": len(returned),
            "only_matching": only_matching,
            "success": only_matching and len(returned) >= expected,
            "messages": event.messages,
            "visits": event.visits,
            "latency_s": self.sim.now - started,
            "exhausted": event.exhausted,
            "timeouts": event.timeouts,
            "owners": len({self.attributes[a].get("owner") for a in returned}),
            "regions": len({self.attributes[a].get("region") for a in returned}),
        })

    # -- results ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        out = self.without_unasked_lookups(super().summary())
        s = self.p
        nodes = len(self.sim.hosts)
        out["log2_n"] = round(math.log2(nodes), 3)
        out.update(self._tree_summary())
        out.update(self._check_summary())
        ok = [r for r in self.aggregate_results if r[0]]
        errors = sorted(r[1] for r in ok if r[1] is not None)
        out["aggregates"] = len(self.aggregate_results)
        out["aggregate_ok"] = ratio(len(ok), len(self.aggregate_results))
        out["aggregate_error_median"] = rounded(percentile_of_sorted(errors, 0.5))
        out["aggregate_error_max"] = rounded(errors[-1]) if errors else None
        results = self.prospect_results
        with_enough = [r for r in results if r["matches"] >= s["prospect_n"]]
        with_some = [r for r in results if r["matches"] >= 1]
        fewer = [r for r in results if 1 <= r["matches"] < s["prospect_n"]]
        messages = sorted(r["messages"] for r in results)
        out["prospects"] = len(results)
        out["prospects_unfinished"] = sum(1 for w in self.pending_queries.values() if w[0] == "prospect")
        out["queries_abandoned"] = self.queries_abandoned
        out["prospects_with_n_matches"] = len(with_enough)
        out["prospect_success"] = ratio(sum(r["success"] for r in with_enough), len(with_enough))
        out["prospect_success_any_match"] = ratio(sum(r["success"] for r in with_some), len(with_some))
        out["prospects_fewer_than_n"] = len(fewer)
        out["prospect_fewer_found_all"] = ratio(sum(r["success"] for r in fewer), len(fewer))
        out["prospect_only_matching"] = ratio(sum(r["only_matching"] for r in results), len(results))
        out["prospect_messages"] = round(statistics.fmean(messages), 3) if messages else None
        out["prospect_messages_median"] = percentile_of_sorted(messages, 0.5)
        out["prospect_messages_p95"] = percentile_of_sorted(messages, 0.95)
        # at least n matches: the search stops at n; fewer: it must rule out every other subtree
        out["prospect_messages_with_n_matches"] = (round(statistics.fmean(r["messages"] for r in with_enough), 3)
                                                   if with_enough else None)
        out["prospect_messages_fewer_than_n"] = (round(statistics.fmean(r["messages"] for r in fewer), 3)
                                                 if fewer else None)
        out["prospect_visits_mean"] = round(statistics.fmean(r["visits"] for r in results), 3) if results else None
        latencies = sorted(r["latency_s"] for r in results)
        out["prospect_latency_median_s"] = rounded(percentile_of_sorted(latencies, 0.5))
        full = [r for r in results if r["returned"] >= 2]
        out["prospect_distinct_owners"] = (round(statistics.fmean(r["owners"] / r["returned"] for r in full), 3)
                                           if full else None)
        out["prospect_distinct_regions"] = (round(statistics.fmean(r["regions"] / r["returned"] for r in full), 3)
                                            if full else None)
        per_requirement = {}
        for index, requirement in enumerate(self.requirements):
            mine = [r for r in results if r["index"] == index]
            if mine:
                per_requirement[str(requirement)] = {
                    "queries": len(mine),
                    "matching_nodes": len(self.matching[index]),
                    "success": ratio(sum(r["success"] for r in mine), len(mine)),
                    "messages": round(statistics.fmean(r["messages"] for r in mine), 2),
                }
        out["prospect_by_requirement"] = per_requirement
        out["prospect_failures"] = [  # the first few, to see why
            {key: r[key] for key in ("index", "matches", "returned", "only_matching", "visits", "exhausted", "timeouts")}
            for r in results if r["matches"] >= 1 and not r["success"]
        ][:10]
        updates = sum(p.counters["updates_sent"] for p in self.prospectors if p is not None)
        up = sum(1 for p in self.prospectors if p is not None)
        duration = self.scenario.values["duration_s"]
        out["updates_per_node_s"] = round(updates / up / duration, 4) if up else None
        return out

    def _tree_summary(self) -> dict[str, Any]:
        live = [p for p in self.prospectors if p is not None]
        depths = sorted(p.depth for p in live if p.depth is not None)
        roots = [p for p in live if p.is_root]
        root = self.true_root()
        root_core = self.prospectors[root] if root is not None else None
        return {
            "tree_depth_max": depths[-1] if depths else None,
            "tree_depth_median": percentile_of_sorted(depths, 0.5),
            "nodes_without_depth": len(live) - len(depths),
            "roots": len(roots),
            "root_children": len(root_core.children) if root_core is not None else None,
        }

    def _check_summary(self) -> dict[str, Any]:
        checks = self.checks
        if not checks:
            return {"count_error": None, "sum_error": None, "convergence_s": None}
        s = self.p
        last = checks[-1]
        out: dict[str, Any] = {
            "root_count": last[2],
            "live_nodes": last[1],
            "checks": len(checks),
        }
        if self.scenario.values["churn"]["model"] == "none":
            out["count_error"] = rounded(last[3])
            out["sum_error"] = rounded(last[4])
            inexact = [t for t, _, _, count_error, sum_error in checks if count_error or sum_error]
            if last[3] or last[4]:
                out["convergence_s"] = None
            else:
                converged = bisect.bisect_right([c[0] for c in checks], inexact[-1]) if inexact else 0
                out["convergence_s"] = checks[converged][0]
            out["convergence_rounds"] = (round(out["convergence_s"] / s["update_interval_s"], 3)
                                         if out["convergence_s"] is not None else None)
            return out
        measured = sorted(c[3] for c in checks if c[0] >= s["measure_from_s"])
        sums = sorted(c[4] for c in checks if c[0] >= s["measure_from_s"])
        out["count_error"] = rounded(measured[-1]) if measured else None
        out["count_error_median"] = rounded(percentile_of_sorted(measured, 0.5))
        out["count_error_p99"] = rounded(percentile_of_sorted(measured, 0.99))
        out["count_within_5pct"] = ratio(sum(1 for e in measured if e <= 0.05), len(measured))
        out["sum_error"] = rounded(sums[-1]) if sums else None
        out["sum_error_median"] = rounded(percentile_of_sorted(sums, 0.5))
        return out


def _prospector(core: Protocol) -> Prospector:
    assert isinstance(core, Stack)
    return core.layer(Prospector)


def _aggregate_count(core: Protocol, now: float) -> int:
    return _prospector(core).aggregate(None, "count", now)


def _prospect(requirement: Requirement, n: int, core: Protocol, now: float) -> int:
    return _prospector(core).prospect(requirement, n, now)
