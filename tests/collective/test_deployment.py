"""Service deployment on whole simulated nodes: managers, placement and self-healing.

Each test runs ten (or a few) full node stacks on the simulator (``tests/deploynet.py``): the
layers a ``p2pdeploy join`` node runs, the simulated executor serving their replicas, every
message through the wire codec.
"""

from __future__ import annotations

import dataclasses

from p2pdeploy import wire
from p2pdeploy.collective.deployment import Decision, Deployment
from p2pdeploy.collective.deployment_messages import ReplicaEntry, ReplicaReport, ServiceId
from p2pdeploy.collective.persistence import Accept, Persistence
from p2pdeploy.collective.pubsub import Delivered, PubSub
from p2pdeploy.collective.records import Ballot
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import sign_record
from p2pdeploy.overlay.swim import DetectorConfig
from p2pdeploy.resource.description import NodeDescription
from p2pdeploy.resource.protocol import Refused, RemoteClient, RemoteControl, RequestAnswered, StopReplica
from tests.deploynet import DeployNet, service_bundle


def deployed(net: DeployNet, address: int = 0, name: str = "web", **bundle_options):
    owner = net.identity_of(address)
    bundle, manifest = service_bundle(owner, name, **bundle_options)
    done = net.deploy(address, bundle, manifest)
    assert done.ok, done.reason
    return ServiceId(name, owner.public_key)


def web_at_three_replicas(seed: int) -> tuple[DeployNet, ServiceId]:
    """Ten nodes running "web" (node 0's) at 3 replicas."""
    net = DeployNet(10, seed=seed)
    net.run_for(5)
    service = deployed(net)
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 60)
    return net, service


def decisions(net: DeployNet, kind: str | None = None) -> list[Decision]:
    return [e for _, e in net.events if isinstance(e, Decision) and (kind is None or e.decision == kind)]


def test_a_service_runs_its_replicas_on_distinct_nodes_of_distinct_owners():
    net, service = web_at_three_replicas(seed=1)
    net.run_for(10)
    hosts = net.replicas_of("web")
    assert len(hosts) == 3 and len(set(hosts.values())) == 3
    owners = {net.contributions[a].owner for a in hosts.values()}
    assert len(owners) == 3  # spread over owners: five owners among ten nodes
    assert len(net.managers_of(service.key)) == 1


def test_a_replica_whose_host_dies_is_replaced_elsewhere():
    net, service = web_at_three_replicas(seed=2)
    manager = net.managers_of(service.key)[0]
    victim = next(a for a in net.replicas_of("web").values() if a != manager)
    crashed_at = net.now
    net.crash(victim)
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 60)
    healed_after = net.now - crashed_at
    assert victim not in net.replicas_of("web").values()
    assert healed_after < 15  # the detector's verdict (about 3 to 9 s) and a start
    [lost] = decisions(net, "lost")
    assert lost.host == net.node_ids[victim] and lost.reason.endswith("declared dead")
    [replaced] = decisions(net, "replaced")
    assert replaced.replica_id in net.replicas_of("web") and replaced.host != net.node_ids[victim]


def test_a_paused_host_is_not_replaced():
    net, service = web_at_three_replicas(seed=3)
    before = dict(net.replicas_of("web"))
    victim = next(iter(before.values()))
    net.pause(victim)
    net.run_for(2)
    net.resume(victim)
    net.run_for(30)
    assert net.replicas_of("web") == before
    assert not decisions(net, "lost") and not decisions(net, "replaced")


def test_when_the_manager_dies_the_next_member_of_the_group_takes_over():
    net, service = web_at_three_replicas(seed=4)
    [manager] = net.managers_of(service.key)
    net.crash(manager)
    net.run_until(lambda: net.managers_of(service.key) and len(net.replicas_of("web")) == 3, 60)
    net.run_for(20)
    [successor] = net.managers_of(service.key)
    assert successor != manager
    group = net.deployment(successor).records[service.key].group
    assert successor in [net.index_of(member.node_id) for member in group]
    assert len(net.replicas_of("web")) == 3  # the new manager learned the replicas: none doubled
    asker = next(a for a in range(10) if a not in (manager, successor))
    status = net.status(asker, service)
    assert status.report is not None and status.report.managing
    assert status.report.manager.node_id == net.node_ids[successor]
    assert sorted(r.replica_id for r in status.report.replicas) == sorted(net.replicas_of("web"))


def test_a_member_that_restarts_alone_manages_though_its_detector_has_not_probed_the_closer_one_yet():
    # A restarted node watches its groups' members anew, each alive until its detector probes it:
    # with many peers at a WAN period that takes minutes (availability.toml at 1,000 nodes: 139
    # peers at 5 s). The closer member, down all along, never tells it manages; after
    # manager_silence_reports intervals without a word from it the restarted member manages.
    net = DeployNet(10, seed=4, detector=DetectorConfig(protocol_period_s=30.0, probe_timeout_s=10.0))
    net.run_for(5)
    service = deployed(net)
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 120)
    [first] = net.managers_of(service.key)
    group = sorted(net.deployment(first).records[service.key].group, key=lambda c: c.node_id ^ service.key)
    closest, second, third = (net.index_of(member.node_id) for member in group)
    assert first == closest
    net.crash(closest)
    net.crash(third)
    net.run_until(lambda: net.managers_of(service.key) == [second], 60)  # the closest fell silent
    net.crash(second)
    net.run_for(30)
    net.restart(second)
    restarted_at = net.now
    assert net.deployment(second)._liveness(net.node_ids[closest]).name == "alive"  # not probed yet
    net.run_until(lambda: net.managers_of(service.key) == [second], 60)
    c = net.deployment_config
    assert net.now - restarted_at <= c.report_interval_s * c.manager_silence_reports + 2 * c.tick_s


def test_undeploy_stops_every_replica_and_frees_every_reservation():
    net, service = web_at_three_replicas(seed=5)
    op = net.call(7, lambda s, now: s.layer(Deployment).undeploy("web", now))
    assert not net.finished_op(7, op).ok  # node 7's key owns no service "web"
    op = net.call(0, lambda s, now: s.layer(Deployment).undeploy("web", now))
    assert net.finished_op(0, op).ok
    net.run_until(lambda: not net.replicas_of("web", states=("requested", "fetching", "installing", "starting",
                                                                  "running", "stopping")), 60)
    net.run_for(10)  # the next reports: the manager releases what it no longer wants
    for address in range(10):
        admission = net.layer(address, ReplicaHost).admission
        assert not admission.holders() and not admission.retained  # the disk too, before the retention period


def test_a_host_that_comes_back_has_its_surplus_replica_stopped():
    net, service = web_at_three_replicas(seed=6)
    manager = net.managers_of(service.key)[0]
    victim = next(a for a in net.replicas_of("web").values() if a != manager)
    net.partition([[victim], [a for a in range(10) if a != victim]])
    net.run_until(lambda: len([a for a in net.replicas_of("web").values() if a != victim]) == 3, 60)
    net.heal()
    net.run_for(60)
    assert len(net.replicas_of("web")) == 3
    assert decisions(net, "surplus_stopped")


def test_a_requirement_no_node_can_meet_is_refused_at_deploy_time():
    net = DeployNet(6, seed=7)
    net.run_for(30)  # the resource tree forms
    owner = net.identity_of(0)
    bundle, manifest = service_bundle(owner, "big", cpu=64)
    done = net.deploy(0, bundle, manifest)
    assert not done.ok
    assert "64" in done.reason and "largest offers 2" in done.reason


def test_without_room_a_service_stays_pending_and_is_placed_when_room_appears():
    net = DeployNet(6, seed=8, max_services=1)
    net.run_for(30)
    first = deployed(net, 0, "first", placement="replicas = 4")
    net.run_until(lambda: len(net.replicas_of("first")) == 4, 60)
    deployed(net, 0, "second", placement="replicas = 3")
    net.run_for(30)
    assert len(net.replicas_of("second")) == 2
    assert any("pending" in d.reason for d in decisions(net, "pending"))
    op = net.call(0, lambda s, now: s.layer(Deployment).undeploy("first", now))
    assert net.finished_op(0, op).ok
    net.run_until(lambda: len(net.replicas_of("second")) == 3, 120)
    assert first.key not in {k for a in range(6) for k, m in net.deployment(a).managers.items() if m.desired}


def test_a_record_signed_by_another_key_cannot_replace_the_owners_service():
    net = DeployNet(6, seed=9)
    net.run_for(5)
    service = deployed(net)
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 60)
    [manager] = net.managers_of(service.key)
    record = net.deployment(manager).records[service.key]
    thief = net.identity_of(3)
    owner_spec = net.deployment(manager).managers[service.key].spec
    undeployed = wire.encode(dataclasses.replace(owner_spec, undeployed=True))
    _, forged = sign_record(thief, service.record_name, undeployed, record.item_sequence + 1)
    high = Ballot(1 << 40, net.node_ids[3], 1)
    for member in record.group:
        net.sim.network.send(3, [(net.index_of(member.node_id),
                                  Accept(1, net.node_ids[3], service.key, high, forged, list(record.group)))])
    net.run_for(20)
    assert all(net.layer(net.index_of(m.node_id), Persistence).dropped["bad_accept"] >= 1 for m in record.group)
    assert not net.deployment(manager).managers[service.key].spec.undeployed
    assert len(net.replicas_of("web")) == 3
    # and the owner's API of another key names another service: it owns nothing called "web"
    op = net.call(3, lambda s, now: s.layer(Deployment).scale("web", now, replicas=1))
    finished = net.finished_op(3, op)
    assert not finished.ok and "no service web owned by this key" in finished.reason


def test_mode_every_runs_one_replica_on_each_node_that_satisfies_the_constraints():
    net = DeployNet(8, seed=10)
    net.run_for(30)
    deployed(net, 0, "agent", placement='mode = "every"\nconstraints = \'owner != "ada"\'')
    eligible = {a for a in range(8) if net.contributions[a].owner != "ada"}
    net.run_until(lambda: set(net.replicas_of("agent").values()) == eligible, 120)
    net.run_for(30)
    assert sorted(net.replicas_of("agent").values()) == sorted(eligible)  # one each, none on ada's nodes
    # a node that comes (back) later gets one too
    late = max(eligible)
    net.crash(late)
    net.run_for(30)
    net.restart(late)
    net.run_until(lambda: late in net.replicas_of("agent").values(), 120)


def test_an_availability_target_chooses_the_count_from_the_nodes_uptime():
    net = DeployNet(10, seed=11)
    for address in range(10):  # what each node's uptime history says of it
        net.call(address, lambda s, now: s.layer(NodeDescription).set_availability(0.9, now))
    net.run_for(30)
    service = deployed(net, 0, "web", placement="availability = 0.999\nmax_replicas = 5")
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 120)
    net.run_for(30)
    assert len(net.replicas_of("web")) == 3  # 1 - 0.1**3 = 0.999: three nodes up 90% of the time
    [manager] = net.managers_of(service.key)
    assert "availability 0.999" in net.deployment(manager).managers[service.key].desired_reason


def test_a_new_version_starts_its_replicas_before_the_old_ones_stop():
    net = DeployNet(10, seed=12)
    net.run_for(5)
    service = deployed(net, 0, "web", placement="replicas = 2")
    net.run_until(lambda: len(net.replicas_of("web")) == 2, 60)
    old = set(net.replicas_of("web"))
    bundle, manifest = service_bundle(net.identity_of(0), "web", placement="replicas = 2", version="2.0")
    done = net.deploy(0, bundle, manifest)
    assert done.ok and done.version == 2
    running_counts = []
    net.run_until(lambda: running_counts.append(len(net.replicas_of("web"))) or
                  (not old & set(net.replicas_of("web")) and len(net.replicas_of("web")) == 2), 120)
    assert min(running_counts) >= 2  # make-before-break: never fewer than two running
    [manager] = net.managers_of(service.key)
    assert net.deployment(manager).managers[service.key].version == 2


def test_a_false_report_of_replicas_changes_nothing():
    net, service = web_at_three_replicas(seed=13)
    real = dict(net.replicas_of("web"))
    [manager] = net.managers_of(service.key)
    liar = next(a for a in range(10) if a not in real.values() and a != manager)
    fake = [ReplicaEntry(f"web-fake{i}", "running", "", True, 1, b"") for i in range(5)]
    for _ in range(3):
        net.sim.network.send(liar, [(manager, ReplicaReport(service.key, net.node_ids[liar], fake))])
        net.run_for(5)
    net.run_for(30)
    assert net.replicas_of("web") == real  # no real replica was stopped as "surplus"
    managed = net.deployment(manager).managers[service.key]
    assert not any(r.startswith("web-fake") for r in managed.replicas)
    assert not decisions(net, "surplus_stopped") and not decisions(net, "stopped")  # nothing was acted on
    assert not any(isinstance(msg, StopReplica) for _, _, msg in net.sent)
    assert net.deployment(manager).dropped["unconfirmed_replica"] >= 5


def test_replica_changes_and_decisions_are_published_on_the_services_topic():
    net = DeployNet(10, seed=14)
    net.run_for(5)
    service = ServiceId("web", net.identity_of(0).public_key)
    watcher = 9
    net.call(watcher, lambda s, now: s.layer(PubSub).subscribe(service.topic, None, now))
    net.run_for(5)
    deployed(net)
    net.run_until(lambda: len(net.replicas_of("web")) == 3, 60)
    net.run_for(10)
    seen = [e.attributes for e in net.events_of(Delivered, watcher)]
    placed = {a["replica"] for a in seen if a["kind"] == "service_decided" and a["decision"] == "placed"}
    running = {a["replica"] for a in seen if a["kind"] == "replica_changed" and a["state"] == "running"}
    assert placed == running == set(net.replicas_of("web"))
    states = [a["state"] for a in seen if a["kind"] == "replica_changed" and a["replica"] == min(running)]
    assert states[0] == "fetching" and states[-1] == "running"  # its way through the states, in order
    assert all(a["service"] == str(service) for a in seen)


def test_a_start_must_name_the_service_its_bundle_belongs_to():
    net = DeployNet(4, seed=15)
    net.run_for(5)
    owner = net.identity_of(0)
    bundle, _ = service_bundle(owner, "web")
    target = 2

    def start(replica_id: str, service: tuple[int, str]):
        request = net.call(1, lambda s, now: s.layer(RemoteClient).start(
            target, net.node_ids[target], replica_id, bundle, now, service=service))
        net.run_until(lambda: any(e.request_id == request for e in net.events_of(RequestAnswered, 1)), 30)
        return next(e.reply for e in net.events_of(RequestAnswered, 1) if e.request_id == request)

    other = ServiceId("web", net.identity_of(1).public_key)  # the key of another owner's "web"
    refused = start("web-a", (other.key, "web"))
    assert isinstance(refused, Refused) and refused.check == "service"
    mine_but_misnamed = ServiceId("api", owner.public_key)
    refused = start("web-b", (mine_but_misnamed.key, "api"))
    assert isinstance(refused, Refused) and refused.check == "bundle" and "'api'" in refused.reason
    accepted = start("web-c", (ServiceId("web", owner.public_key).key, "web"))
    assert not isinstance(accepted, Refused)
    assert net.layer(target, RemoteControl).managed["web-c"].service_name == "web"


def test_a_service_whose_replicas_keep_failing_backs_off_instead_of_looping():
    net = DeployNet(6, seed=16)
    net.run_for(30)
    broken = '[simulation]\nexit_after_s = 1\nexit_code = 3\n[restart]\npolicy = "never"\n'
    service = deployed(net, 0, "web", placement="replicas = 1", extra=broken)
    net.run_for(600)
    starts = [d for d in decisions(net) if d.decision in ("placed", "replaced")]
    # without a backoff a replica would start every ~12 s (grace 10 s and a start): 50 in 10 min
    assert 3 <= len(starts) <= 12
    [manager] = net.managers_of(service.key)
    assert "keep failing" in net.deployment(manager).managers[service.key].pending


def test_a_report_in_a_hosts_name_from_another_address_changes_nothing():
    net, service = web_at_three_replicas(seed=17)
    real = dict(net.replicas_of("web"))
    [manager] = net.managers_of(service.key)
    victim_id, host = next((r, a) for r, a in real.items() if a != manager)
    liar = next(a for a in range(10) if a not in real.values() and a != manager)
    forged = [ReplicaEntry(victim_id, "failed", "forged", False, 1, b"")]
    for _ in range(8):  # a host reporting its replica failed, over the unhealthy grace
        net.sim.network.send(liar, [(manager, ReplicaReport(service.key, net.node_ids[host], forged))])
        net.run_for(2)
    net.run_for(10)
    assert net.replicas_of("web") == real
    assert not decisions(net, "stopped") and not decisions(net, "replaced")
    assert net.deployment(manager).dropped["report_from_another_address"] >= 8


def test_a_host_whose_routing_table_holds_the_managers_old_address_still_reaches_it():
    # A node that restarts listens at a new address; a host whose table has not heard from it
    # since still holds the old one (as a real host did after the manager of its service came
    # back: its stopped replica was never released after an undeploy). Here the table is set
    # back to an address where nobody listens every second, as if it never heard from the manager.
    net, service = web_at_three_replicas(seed=18)
    [manager] = net.managers_of(service.key)
    host = next(a for a in net.replicas_of("web").values() if a != manager)
    nowhere = 10_000
    op = net.call(0, lambda s, now: s.layer(Deployment).undeploy("web", now))
    assert net.finished_op(0, op).ok
    every_state = ("requested", "fetching", "installing", "starting", "running", "stopping", "stopped", "failed")
    for _ in range(60):
        net.layer(host, Kademlia).table.add(Contact(net.node_ids[manager], nowhere))
        net.run_for(1)
        if not net.replicas_of("web", states=every_state):
            break
    assert not net.replicas_of("web", states=every_state)
    admission = net.layer(host, ReplicaHost).admission
    assert not admission.holders() and not admission.retained
