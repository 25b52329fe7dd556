"""The ``multicast`` runner: one multicast group over the Kademlia overlay.

Every node hosts a :class:`~p2pdeploy.core.Stack` of the overlay and a
:class:`~p2pdeploy.overlay.multicast.Multicast`. The network is built by the ``overlay`` runner
(``overlay.build = "oracle"`` for thousands of nodes; its churn hooks apply). Then:

1. **join** (from ``join_delay_s`` after the build settled): ``members`` random nodes join the
   group, spread over ``join_window_s``;
2. **messages** (from ``messages_delay_s`` after the join window, once the tree has formed):
   ``messages`` group messages, one every ``messages_interval_s``, each from a random live
   member or, with probability ``outside_publishers``, from a random live node outside the group;
3. optionally **failures** at ``fail_at_s``: the group's root and ``fail_members`` random members
   crash (the messages after it show the repair).

A message's *audience* is the members that were up when it was sent. ``delivery_ratio`` is
audience reached over audience (all messages), ``all_delivered`` the fraction of messages that
reached their whole audience. Every transmission of group data by a node other than the message's
publisher is a *forward*; ``nonmember_forward_fraction`` is the share of forwards made by nodes
outside the group (Scribe's forwarders and root; zero for the member tree, whose root is on no data
path). Forwards are counted from the first message on, so join traffic is not in them.
``tree = "scribe"`` runs Scribe's tree for comparison (``--set multicast.tree=scribe``).
"""

from __future__ import annotations

import math
import statistics
from functools import partial
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.broadcast import SpreadConfig
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.multicast import (
    TREES,
    GroupDelivered,
    GroupJoined,
    GroupSendFinished,
    Multicast,
    MulticastConfig,
)
from p2pdeploy.sim.metrics import rounded
from p2pdeploy.sim.runner import SummedCounters, register_runner
from p2pdeploy.sim.runners.broadcast import settled_at
from p2pdeploy.sim.runners.overlay import OverlayRunner, overlay_table_without_lookups
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario
    from p2pdeploy.sim.simulation import Simulation

#: The run must go on this long after the last message (a locate and a few timeouts fit in it).
LAST_MESSAGE_GRACE_S = 10.0
COUNTERS = ("data_sent", "forwards_member", "forwards_nonmember", "acks_sent", "route_hops", "publish_hops",
            "views_sent", "anchor_syncs")


class _Message:
    __slots__ = ("index", "sent_at", "publisher", "outside", "msg_id", "audience", "reached", "hops",
                 "after_failures", "unreached")

    def __init__(self, index: int, sent_at: float) -> None:
        self.index = index
        self.sent_at = sent_at
        self.publisher: int | None = None
        self.outside = False
        self.msg_id: int | None = None
        self.audience: set[int] = set()
        self.reached: set[int] = set()
        self.hops: list[int] = []
        self.after_failures = False
        self.unreached: int | None = None


@register_runner
class MulticastRunner(OverlayRunner):
    name = "multicast"
    schema = {
        "detector": OverlayRunner.schema["detector"],
        "overlay": overlay_table_without_lookups(),
        "multicast": {
            **config_keys(MulticastConfig, tree=Tunable("members (member-only dissemination tree) or scribe", choices=TREES)),
            "group": Field("group/0", str, "the group's name; its root is the node closest to its id"),
            "members": Field(100, int, "nodes that join the group", ge=1),
            "join_delay_s": Field(5.0, float, "joins start this long after the build settled", ge=0),
            "join_window_s": Field(10.0, float, "joins are spread over this window", ge=0),
            "messages": Field(50, int, "group messages sent", ge=0),
            "messages_delay_s": Field(20.0, float, "first message this long after the join window", ge=0),
            "messages_interval_s": Field(1.0, float, "time between messages", gt=0),
            "outside_publishers": Field(0.2, float, "probability that a message comes from a non-member", ge=0, le=1),
            "reliable": Field(False, bool, "acknowledged hand-offs with re-delegation (members tree only)"),
            "payload_bytes": Field(64, int, "size of each message", ge=0),
            **config_keys(
                MulticastConfig,
                refresh_interval_s=Tunable("members refresh their join this often", gt=0),
                anchors=Tunable("nodes holding the member list: the root and the next closest", ge=1),
                view_per_subtree=Tunable("members per sibling subtree in a member's view", ge=1),
                entries=Tunable("entry members handed to a publisher outside the group", ge=1),
                hop_timeout_s=Tunable("a routing hop that does not acknowledge within this is suspected", gt=0),
            ),
            **config_keys(SpreadConfig, ack_timeout_s=Tunable("reliable: a member must accept its block within this", gt=0)),
            "fail_at_s": Field(0.0, float, "crash the root and fail_members members at this time (0: never)", ge=0),
            "fail_members": Field(0, int, "members crashed at fail_at_s", ge=0),
        },
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        m = scenario.values["multicast"]
        if m["members"] > scenario.values["nodes"]:
            raise scenario.error("multicast.members", f"must be <= nodes ({scenario.values['nodes']})")
        if m["reliable"] and m["tree"] == "scribe":
            raise scenario.error("multicast.reliable", 'needs multicast.tree = "members"')
        if m["fail_members"] > m["members"]:
            raise scenario.error("multicast.fail_members", "must be <= multicast.members")
        last = (settled_at(scenario) + m["join_delay_s"] + m["join_window_s"] + m["messages_delay_s"]
                + max(0, m["messages"] - 1) * m["messages_interval_s"])
        if m["messages"] and scenario.values["duration_s"] < last + LAST_MESSAGE_GRACE_S:
            raise scenario.error("duration_s", f"must be >= {last + LAST_MESSAGE_GRACE_S:g}: the last message goes "
                                 f"out at {last:g} s and needs time to arrive")

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        m = scenario.section("multicast")
        self.group_settings = m
        self.group = m["group"]
        self.multicast_config = config_from(m, MulticastConfig, spread=config_from(m, SpreadConfig))
        self.payload = bytes(m["payload_bytes"])
        self.members: set[int] = set()
        self.join_called: dict[int, float] = {}
        self.join_times: list[float] = []
        self.messages: list[_Message] = []
        self.by_id: dict[int, _Message] = {}
        self.layer_counters = SummedCounters(COUNTERS, lambda core: _multicast(core).counters)
        self.failed_root: int | None = None
        self.sending: _Message | None = None
        self.failures_at: float | None = None

    # -- nodes -----------------------------------------------------------------------------
    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        rng = self.sim.streams.fresh("multicast", address, self.sim.hosts[address].incarnation + 1)
        return Stack([*self.below_overlay[address], overlay, Multicast(overlay, rng, address, self.multicast_config)])

    def on_down(self, address: int) -> None:
        self.layer_counters.harvest(self.sim.hosts[address].core)
        super().on_down(address)

    def on_up(self, address: int) -> None:
        super().on_up(address)
        if address in self.members:  # a member that comes back joins again (its subscription is its own)
            self.sim.hosts[address].call(partial(_join, self.group))

    # -- the workload ----------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        m = self.group_settings
        engine = self.sim.engine
        join_at = self.store_at + m["join_delay_s"]
        for address in self.rng.sample(range(len(self.sim.hosts)), m["members"]):
            engine.schedule(join_at + self.rng.uniform(0, m["join_window_s"]), self._join, address)
        first = join_at + m["join_window_s"] + m["messages_delay_s"]
        self.messages_at = first
        for index in range(m["messages"]):
            message = _Message(index, first + index * m["messages_interval_s"])
            self.messages.append(message)
            engine.schedule(message.sent_at, self._send, message)
        if m["fail_at_s"] > 0:
            engine.schedule(m["fail_at_s"], self._fail)

    def _join(self, address: int) -> None:
        host = self.sim.hosts[address]
        self.members.add(address)
        if host.up:
            self.join_called[address] = self.sim.now
            host.call(partial(_join, self.group))

    def _send(self, message: _Message) -> None:
        hosts = self.sim.hosts
        live_members = sorted(a for a in self.members if hosts[a].up)
        outside = self.rng.random() < self.group_settings["outside_publishers"]
        publisher = None
        if outside:
            publisher = self._random_live(joined_only=True)
            if publisher in self.members:
                publisher = None
        if publisher is None and live_members:
            publisher, outside = self.rng.choice(live_members), False
        if publisher is None:
            return
        message.publisher, message.outside = publisher, outside
        message.audience = set(live_members)
        message.after_failures = self.failures_at is not None
        reliable = self.group_settings["reliable"]
        self.sending = message  # a member publisher delivers to itself within the call
        message.msg_id = hosts[publisher].call(partial(_send, self.group, self.payload, reliable))
        self.sending = None
        self.by_id[message.msg_id] = message

    def _fail(self) -> None:
        hosts = self.sim.hosts
        roots = [a for a, h in enumerate(hosts) if h.up and _multicast(h.core).is_root(self.group)]
        victims = list(roots)
        live_members = sorted(a for a in self.members if hosts[a].up and a not in roots)
        victims += self.rng.sample(live_members, min(self.group_settings["fail_members"], len(live_members)))
        self.failed_root = roots[0] if roots else None
        self.failures_at = self.sim.now
        for address in victims:
            self.on_down(address)

    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is GroupDelivered:
            message = self.by_id.get(event.msg_id)
            if message is None and self.sending is not None and address == self.sending.publisher:
                message = self.sending
            if message is not None:
                message.reached.add(address)
                message.hops.append(event.hops)
            return
        if kind is GroupJoined:
            called = self.join_called.pop(address, None)
            if called is not None:
                self.join_times.append(self.sim.now - called)
            return
        if kind is GroupSendFinished:
            message = self.by_id.get(event.msg_id)
            if message is not None:
                message.unreached = event.unreached_blocks
            return
        super().on_event(address, event)

    # -- results ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        base = super().summary()
        sent = [m for m in self.messages if m.msg_id is not None and m.audience]
        totals = self.layer_counters.totals(self.sim.hosts)
        forwards = totals["forwards_member"] + totals["forwards_nonmember"]
        audience = sum(len(m.audience) for m in sent)
        hops = [h for m in sent for h in m.hops]
        out: dict[str, Any] = {
            "log2_n": round(math.log2(len(self.sim.hosts)), 3),
            "tree": self.group_settings["tree"],
            "members": len(self.members),
            "members_joined": len(self.join_times),
            "join_time_median_s": rounded(statistics.median(self.join_times)) if self.join_times else None,
            "messages": len(sent),
            "messages_from_outside": sum(m.outside for m in sent),
            "delivery_ratio": rounded(sum(len(m.reached & m.audience) for m in sent) / audience) if audience else None,
            "all_delivered": rounded(sum(m.audience <= m.reached for m in sent) / len(sent)) if sent else None,
            "delivered_to_nonmembers": sum(len(m.reached - self.members) for m in sent),
            "forwards": forwards,
            "forwards_nonmember": totals["forwards_nonmember"],
            "nonmember_forward_fraction": rounded(totals["forwards_nonmember"] / forwards) if forwards else None,
            "data_messages_per_message": rounded((totals["data_sent"] + totals["publish_hops"]) / len(sent)) if sent
            else None,
            "depth_max": max(hops) if hops else None,
            "depth_mean": rounded(sum(hops) / len(hops)) if hops else None,
            "log2_members": round(math.log2(max(1, len(self.members))), 3),
            "acks_sent": totals["acks_sent"],
            "control_route_hops": totals["route_hops"] - totals["publish_hops"],
            "views_sent": totals["views_sent"],
            "anchor_syncs": totals["anchor_syncs"],
            "forwarders_outside_group": self._outside_forwarders(),
        }
        if self.failures_at is not None:
            after = [m for m in sent if m.after_failures]
            reached = sum(len(m.reached & m.audience) for m in after)
            out["failures_at_s"] = self.failures_at
            out["failed_root"] = self.failed_root
            out["delivery_ratio_after_failures"] = rounded(reached / sum(len(m.audience) for m in after)) if after \
                else None
            out["all_delivered_after_failures"] = rounded(sum(m.audience <= m.reached for m in after) / len(after)) \
                if after else None
        for key in ("contacts_median", "build_done_s"):
            out[key] = base[key]
        return out

    def _outside_forwarders(self) -> int:
        """Scribe: live nodes outside the group that hold children in its tree (0 for the member tree)."""
        return sum(1 for a, h in enumerate(self.sim.hosts)
                   if h.up and a not in self.members and _multicast(h.core).children(self.group))


def _multicast(core: Protocol | None) -> Multicast:
    assert isinstance(core, Stack)
    return core.layer(Multicast)


def _join(group: str, core: Protocol, now: float) -> int:
    return _multicast(core).join(group, now)


def _send(group: str, payload: bytes, reliable: bool, core: Protocol, now: float) -> int:
    return _multicast(core).send_to(group, payload, now, reliable=reliable)
