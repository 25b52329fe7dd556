"""The ``overlay`` runner: the Kademlia overlay under a lookup and storage workload.

Every node hosts :class:`~p2pdeploy.overlay.kademlia.Kademlia`. The run has three phases:

1. **build** (from t = 0): ``overlay.build = "join"`` starts node 0 and lets node i join at
   ``i * join_spacing_s`` through a random node that is already up, with the real bootstrap
   (probe, self-lookup, bucket refresh). ``"oracle"`` instead fills every routing table from
   the sorted id list (up to ``oracle_per_subtree`` random members of each sibling subtree of
   the node's id, inserted through the table's own rules) — the usual warm start for static
   experiments at 10^4-10^5 nodes, where a join-built network would take hours of events.
2. **store** (at ``store_at_s``, after the build and ``settle_s``): ``values`` random nodes put
   one value each.
3. **workload** (from ``workload_at_s``): ``lookups`` FIND_NODE lookups and ``gets`` gets of the
   stored values, from random live nodes at random times spread over ``workload_window_s``.
   Churn (if any) starts at ``churn.start_s``; a node that comes back rejoins through a random
   live node with the same id (its key is on its disk) and an empty store (its memory is lost),
   or with ``overlay.durable`` the store it had (kept on its disk, as a real node's data
   directory keeps ``overlay.sqlite3``): it serves what it held and republishes what it published.

A lookup is *exact* when its k contacts are the true k closest live nodes to the target
(brute force over the live ids, excluding the node that asked). ``messages_per_lookup`` counts
the requests a lookup sent (each has one answer or a timeout).
"""

from __future__ import annotations

import bisect
import heapq
import math
from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity, node_id_of
from p2pdeploy.overlay.kademlia import (
    GetFinished,
    Joined,
    Kademlia,
    KademliaConfig,
    LookupFinished,
    PutFinished,
)
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import LocalStore
from p2pdeploy.overlay.swim import DetectorConfig, FailureDetector
from p2pdeploy.sim.metrics import ratio
from p2pdeploy.sim.runner import Runner, register_runner
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation


#: The summary keys of the lookup workload.
LOOKUP_KEYS = ("lookups", "lookups_unfinished", "lookups_abandoned", "lookup_success", "exact_k_closest",
               "hops_median", "hops_p99", "messages_per_lookup")


def detector_schema(*, enabled: bool) -> dict[str, Field]:
    """The ``[detector]`` table: the failure detector under every node's overlay."""
    return {
        "enabled": Field(enabled, bool, "every node runs the failure detector under its overlay"),
        "protocol_period_s": Field(5.0, float, "SWIM protocol period (a real node's default, 0.5 s, suits "
                                   "loopback; a WAN-sized network scales it up)", gt=0),
        "probe_timeout_s": Field(1.0, float, "direct probe timeout, seconds", gt=0),
    }


@register_runner
class OverlayRunner(Runner):
    name = "overlay"
    schema = {
        "overlay": {
            **config_keys(
                KademliaConfig,
                k=Tunable("bucket size and replication factor", ge=1),
                alpha=Tunable("lookup parallelism", ge=1),
                disjoint_paths=Tunable("S/Kademlia disjoint lookup paths", ge=1),
                rpc_timeout_s=Tunable("per-request timeout, seconds", gt=0),
                refresh_interval_s=Tunable("bucket refresh period", gt=0),
                replicate_interval_s=Tunable("replica republish period", gt=0),
                republish_interval_s=Tunable("original publisher republish period", gt=0),
            ),
            "ttl_s": Field(86400.0, float, "TTL of stored values", gt=0),
            "build": Field("join", str, "how the network forms: join (real bootstrap) or oracle (prefilled tables)",
                           choices=("join", "oracle")),
            "join_spacing_s": Field(0.05, float, "build=join: node i joins at i * join_spacing_s", ge=0),
            "oracle_per_subtree": Field(40, int, "build=oracle: members of each sibling subtree offered to a table",
                                        ge=1),
            "settle_s": Field(30.0, float, "quiet time after the build before values are stored", ge=0),
            "values": Field(0, int, "values stored before the workload", ge=0),
            "value_bytes": Field(64, int, "size of each stored value", ge=1),
            "store_window_s": Field(10.0, float, "puts are spread over this window", ge=0),
            "lookups": Field(1000, int, "FIND_NODE lookups of random targets", ge=0),
            "gets": Field(0, int, "gets of stored values", ge=0),
            "workload_delay_s": Field(30.0, float, "time between the end of the store window and the workload", ge=0),
            "workload_window_s": Field(60.0, float, "lookups and gets are spread over this window", ge=0),
            "durable": Field(False, bool, "a node keeps its store (values held, republish list) across churn "
                             "restarts, as a machine keeps its disk"),
            "identities": Field("hash", str, "node ids: ed25519 (seeded key pairs) or hash (same distribution)",
                                choices=("ed25519", "hash")),
            "verify_contacts": Field(False, bool, "a contact joins a routing table only after it signed a challenge "
                                     "at its address with its key (a real node's default; needs ed25519 identities)"),
        },
        "detector": detector_schema(enabled=False),
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        if scenario.values["nodes"] < 2:
            raise scenario.error("nodes", 'must be >= 2 for protocol "overlay"')
        d = scenario.values["detector"]
        if not d["probe_timeout_s"] < d["protocol_period_s"]:
            raise scenario.error("detector.probe_timeout_s", "must be shorter than detector.protocol_period_s")
        settings = scenario.values["overlay"]
        if settings["gets"] and not settings["values"]:
            raise scenario.error("overlay.gets", "needs overlay.values >= 1 to have something to get")
        if settings["verify_contacts"] and settings["identities"] != "ed25519":
            raise scenario.error("overlay.verify_contacts", 'needs overlay.identities = "ed25519" (keys to sign with)')

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        s = scenario.section("overlay")
        self.settings = s
        nodes = len(sim.hosts)
        self.config = config_from(s, KademliaConfig, default_ttl_s=s["ttl_s"],
                                  max_ttl_s=max(s["ttl_s"], KademliaConfig().max_ttl_s))
        streams = sim.streams
        self.identities: list[Identity] | None = None
        if s["identities"] == "ed25519":
            self.identities = [Identity.from_seed(streams.bytes("identity", i)) for i in range(nodes)]
            self.node_ids = [identity.node_id for identity in self.identities]
        else:
            self.node_ids = [node_id_of(streams.bytes("identity", i)) for i in range(nodes)]
        self.address_of = {node_id: address for address, node_id in enumerate(self.node_ids)}
        self.rng = streams.get("workload")
        self.cores: list[Kademlia | None] = [None] * nodes
        #: The layers under each node's overlay: its failure detector with ``[detector] enabled``.
        self.below_overlay: list[list[Protocol]] = [[] for _ in range(nodes)]
        d = scenario.section("detector")
        self.detector_config = config_from(d, DetectorConfig) if d["enabled"] else None
        #: overlay.durable: each node's store, kept while the node is down (its disk).
        self.stores: list[LocalStore | None] = [None] * nodes
        self.joined_at: list[float | None] = [None] * nodes
        self.build_done_at = (nodes - 1) * s["join_spacing_s"] if s["build"] == "join" else 0.0
        self.store_at = self.build_done_at + s["settle_s"]
        self.workload_at = self.store_at + s["store_window_s"] + s["workload_delay_s"]
        self.values: dict[int, bytes] = {}
        self.pending: dict[tuple[int, int], tuple[str, Any]] = {}  # (address, query id) -> what it was
        self.lookup_results: list[tuple[bool, bool, int, int]] = []  # success, exact, hops, requests
        self.get_results: list[bool] = []
        self.put_replicas: list[int] = []
        self.joins = 0
        self.joins_failed = 0
        self.abandoned: dict[str, int] = {}  # queries whose node went down before they finished
        self._issuing: int | None = None  # the node whose API is being called (see _issue)
        self._early: dict[int, Any] = {}  # its events that came before the call returned
        metrics = sim.metrics
        self.hops = metrics.distributions.setdefault("lookup_hops", [])
        self.requests = metrics.distributions.setdefault("lookup_requests", [])

    # -- building --------------------------------------------------------------------------
    def make_core(self, address: int) -> Protocol:
        host = self.sim.hosts[address]
        store = None
        if self.settings["durable"]:
            store = self.stores[address]
            if store is None:
                store = self.stores[address] = LocalStore(self.config.max_stored_items, self.config.max_stored_bytes)
        detector = None
        if self.detector_config is not None:
            detector = FailureDetector(self.node_ids[address],
                                       self.sim.streams.fresh("detector", address, host.incarnation + 1),
                                       self.detector_config)
        self.below_overlay[address] = [] if detector is None else [detector]
        core = Kademlia(self.node_ids[address], self.sim.streams.fresh("node", address, host.incarnation + 1),
                        self.config, store=store, detector=detector,
                        identity=None if self.identities is None else self.identities[address])
        self.cores[address] = core
        return self.stack(address, core)

    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        """The core node ``address`` hosts: the overlay alone here (above the failure detector
        with ``[detector] enabled``); a runner for a layer above returns a
        :class:`~p2pdeploy.core.Stack` of ``self.below_overlay[address]``, the overlay and its own layers."""
        below = self.below_overlay[address]
        return Stack([*below, overlay]) if below else overlay

    def start(self) -> None:
        s = self.settings
        engine = self.sim.engine
        if s["build"] == "oracle":
            for address in range(len(self.sim.hosts)):
                super().join(address)
                self.sim.hosts[address].call(_start)
            self._oracle_fill()
            for address in range(len(self.sim.hosts)):
                self.joined_at[address] = 0.0
        else:
            super().join(0)
            self.sim.hosts[0].call(_start)
            self.joined_at[0] = 0.0
            for address in range(1, len(self.sim.hosts)):
                engine.schedule(address * s["join_spacing_s"], self._join_now, address)
        for index in range(s["values"]):
            at = self.store_at + self.rng.uniform(0, s["store_window_s"])
            engine.schedule(at, self._put, index)
        for _ in range(s["lookups"]):
            engine.schedule(self.workload_at + self.rng.uniform(0, s["workload_window_s"]), self._lookup)
        for _ in range(s["gets"]):
            engine.schedule(self.workload_at + self.rng.uniform(0, s["workload_window_s"]), self._get)

    def join(self, address: int) -> None:
        """A rejoin after churn: a fresh core bootstraps through a random live node."""
        self._join_now(address)

    def _join_now(self, address: int) -> None:
        host = self.sim.hosts[address]
        if host.up:
            return
        super().join(address)
        bootstrap = self._random_live(exclude=address, joined_only=True)
        host.call(partial(_bootstrap, [bootstrap] if bootstrap is not None else []))
        self.joins += 1

    def on_down(self, address: int) -> None:
        self.cores[address] = None
        self.joined_at[address] = None
        lost = [key for key in self.pending if key[0] == address]
        for key in lost:  # the node crashed with these queries under way: nobody will answer them
            kind, _ = self.pending.pop(key)
            self.abandoned[kind] = self.abandoned.get(kind, 0) + 1
        super().on_down(address)

    def _oracle_fill(self) -> None:
        """Prefill every table from the sorted ids (see the module docstring)."""
        ids = sorted(self.node_ids)
        per_subtree = self.settings["oracle_per_subtree"]
        rng = self.sim.streams.get("oracle")
        for core in self.cores:
            assert core is not None
            own = core.node_id
            table = core.table
            for depth in range(160):
                bit = 1 << (159 - depth)
                prefix = (own >> (160 - depth)) << (160 - depth) if depth else 0
                sibling_low = prefix | (~own & bit)
                low = bisect.bisect_left(ids, sibling_low)
                high = bisect.bisect_left(ids, sibling_low + bit)
                count = high - low
                if count:
                    picks = range(low, high) if count <= per_subtree else rng.sample(range(low, high), per_subtree)
                    for index in picks:
                        node_id = ids[index]
                        table.add(Contact(node_id, self.address_of[node_id]))
                own_low = prefix | (own & bit)
                if bisect.bisect_left(ids, own_low + bit) - bisect.bisect_left(ids, own_low) <= 1:
                    break  # only this node is left in its own subtree

    # -- workload --------------------------------------------------------------------------
    def _random_live(self, *, exclude: int | None = None, joined_only: bool = False) -> int | None:
        hosts = self.sim.hosts
        for _ in range(64):
            address = self.rng.randrange(len(hosts))
            if address != exclude and hosts[address].up and (not joined_only or self.joined_at[address] is not None):
                return address
        live = [a for a, h in enumerate(hosts) if h.up and a != exclude
                and (not joined_only or self.joined_at[a] is not None)]
        return self.rng.choice(live) if live else None

    def _put(self, index: int) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            return
        key = self.rng.getrandbits(160)
        value = index.to_bytes(4, "big") * (self.settings["value_bytes"] // 4 + 1)
        value = value[: self.settings["value_bytes"]]
        self.values[key] = value
        self._issue(address, partial(_put, key, value, self.settings["ttl_s"]), ("put", key))

    def _lookup(self) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            return
        target = self.rng.getrandbits(160)
        self._issue(address, partial(_lookup, target), ("lookup", target))

    def _get(self) -> None:
        address = self._random_live(joined_only=True)
        if address is None or not self.values:
            return
        key = self.rng.choice(sorted(self.values))
        self._issue(address, partial(_get, key), ("get", key))

    def _issue(self, address: int, api: Any, what: tuple[str, Any]) -> None:
        """Call ``api`` on node ``address`` and await its query's event. A get the node answers
        from its own store finishes inside the call, before its query id is known here: that
        event is held until the call returns (it used to be dropped, the get never counted)."""
        self._issuing, self._early = address, {}
        try:
            query = self.sim.hosts[address].call(api)
        finally:
            self._issuing = None
        self.pending[(address, query)] = what
        early = self._early.pop(query, None)
        if early is not None:
            self.on_event(address, early)

    # -- events ----------------------------------------------------------------------------
    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is Joined:
            self.joined_at[address] = self.sim.now
            if not event.ok:
                self.joins_failed += 1
            return
        what = self.pending.pop((address, getattr(event, "query_id", -1)), None)
        if what is None:
            if address == self._issuing and kind in (LookupFinished, GetFinished, PutFinished):
                self._early[event.query_id] = event
            return
        if kind is LookupFinished:
            truth = self._true_closest(event.target, exclude=address)
            got = [c.node_id for c in event.closest]
            success = len(got) == min(self.config.k, len(truth)) and len(got) > 0
            self.lookup_results.append((success, got == truth, event.hops, event.requests))
            self.hops.append(event.hops)
            self.requests.append(event.requests)
        elif kind is GetFinished:
            expected = self.values.get(event.key)
            self.get_results.append(event.item is not None and event.item.value == expected)
        elif kind is PutFinished:
            self.put_replicas.append(event.stored)

    def _true_closest(self, target: int, exclude: int) -> list[int]:
        hosts = self.sim.hosts
        live = (self.node_ids[a] for a, h in enumerate(hosts) if h.up and a != exclude)
        return heapq.nsmallest(self.config.k, live, key=lambda node_id: node_id ^ target)

    # -- results ---------------------------------------------------------------------------
    def gauges(self) -> dict[str, Any]:
        return {
            "lookups_done": lambda: len(self.lookup_results),
            "gets_done": lambda: len(self.get_results),
        }

    def node_gauges(self) -> dict[str, Any]:
        return {"contacts": self._contacts}

    def _contacts(self, address: int) -> float | None:
        core = self.cores[address]
        return None if core is None else len(core.table)

    def without_unasked_lookups(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` (a summary) without the lookup workload's keys when the scenario asked for no
        lookups: a runner for a layer above reports its own workload, not an empty one."""
        if not self.settings["lookups"]:
            for key in LOOKUP_KEYS:
                out.pop(key, None)
        return out

    def summary(self) -> dict[str, Any]:
        nodes = len(self.sim.hosts)
        lookups = self.lookup_results
        done = len(lookups)
        metrics = self.sim.metrics
        contacts = [len(c.table) for c in self.cores if c is not None]
        out: dict[str, Any] = {
            "log2_n": round(math.log2(nodes), 3),
            "lookups": done,
            "lookups_unfinished": sum(1 for kind, _ in self.pending.values() if kind == "lookup"),
            "lookups_abandoned": self.abandoned.get("lookup", 0),
            "lookup_success": ratio(sum(r[0] for r in lookups), done),
            "exact_k_closest": ratio(sum(r[1] for r in lookups), done),
            "hops_median": metrics.median("lookup_hops"),
            "hops_p99": metrics.percentile("lookup_hops", 0.99),
            "messages_per_lookup": round(sum(r[3] for r in lookups) / done, 3) if done else None,
            "contacts_median": sorted(contacts)[len(contacts) // 2] if contacts else None,
            "joins": self.joins,
            "joins_failed": self.joins_failed,
            "build_done_s": self.build_done_at,
            "workload_at_s": self.workload_at,
        }
        if self.settings["values"]:
            out["values_stored"] = len(self.values)
            out["put_replicas_median"] = sorted(self.put_replicas)[len(self.put_replicas) // 2] if self.put_replicas else None
        if self.settings["gets"]:
            out["gets"] = len(self.get_results)
            out["gets_unfinished"] = sum(1 for kind, _ in self.pending.values() if kind == "get")
            out["gets_abandoned"] = self.abandoned.get("get", 0)
            out["get_success"] = ratio(sum(self.get_results), len(self.get_results))
        return out


def overlay_table_without_lookups(lookups_doc: str = "FIND_NODE lookups of random targets") -> dict[str, Field]:
    """The ``[overlay]`` table of a runner for a layer above the overlay: the overlay runner's,
    but with no lookups unless the scenario asks for them (the workload is the layer's own)."""
    return {**OverlayRunner.schema["overlay"], "lookups": Field(0, int, lookups_doc, ge=0)}


def overlay_of(core: Protocol) -> Kademlia:
    """The Kademlia of a hosted core: the core itself, or the overlay layer of a stack."""
    return core if isinstance(core, Kademlia) else core.layer(Kademlia)


def _start(core: Protocol, now: float) -> None:
    overlay_of(core).start(now)


def _bootstrap(addresses: list[int], core: Protocol, now: float) -> int:
    return overlay_of(core).bootstrap(addresses, now)


def _put(key: int, value: bytes, ttl_s: float, core: Protocol, now: float) -> int:
    return overlay_of(core).put(key, value, now, ttl_s=ttl_s)


def _lookup(target: int, core: Protocol, now: float) -> int:
    return overlay_of(core).lookup(target, now)


def _get(key: int, core: Protocol, now: float) -> int:
    return overlay_of(core).get(key, now)
