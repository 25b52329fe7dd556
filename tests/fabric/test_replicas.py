"""A node's replicas after they end: their files stay for the owner's retention period, holding
the disk they reserved, and are removed when it is over (on the simulator, with its executor)."""

import random

import pytest

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import Contribution, ContributionError
from p2pdeploy.fabric.executor import FilesLeft, HealthCheck, ProcessSpec, RemoveReplica, SimulatedBehaviour
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, RestartPolicy
from p2pdeploy.fabric.units import GIB, MIB
from p2pdeploy.resource.bundle import pack_files
from p2pdeploy.sim.engine import Engine
from p2pdeploy.sim.executor import serve_node
from p2pdeploy.sim.host import SimNode

BUNDLE = pack_files({"manifest.toml": b'name = "job"\nversion = "1"\ncommand = ["run"]\n'})
HOUR = 3600.0


def one_shot(replica_id):
    """A replica that exits with code 0 a second after it starts, and is not restarted."""
    behaviour = SimulatedBehaviour(start_delay_s=0.1, exit_after_s=1.0, exit_code=0)
    return ReplicaSpec(ProcessSpec(replica_id, 1, ("run",), simulated=behaviour), HealthCheck(kind="none"),
                       RestartPolicy(mode="never"))  # fmt: skip


def a_node(contribution):
    engine = Engine()
    node = SimNode(0, engine, network=None)
    host = ReplicaHost(contribution, random.Random(0))
    node.start(host)
    executor = serve_node(node, random.Random(0))
    return engine, node, host, executor


def start(node, replica_id, disk_bytes):
    return node.call(lambda core, now: core.start_replica(one_shot(replica_id), Demand(disk_bytes=disk_bytes), now,
                                                          bundle=BUNDLE))  # fmt: skip


def test_a_finished_replicas_files_hold_its_disk_until_the_retention_period_ends_then_are_removed():
    engine, node, host, executor = a_node(Contribution(disk_bytes=1 * GIB, max_services=2, retention_s=HOUR))
    assert start(node, "job-1", 600 * MIB) is None
    engine.run(until=10)
    assert host.status("job-1").state is ReplicaState.STOPPED
    assert host.admission.reservations == {} and host.admission.retained == {"job-1": 600 * MIB}
    free = host.admission.free()
    assert free.services == 2 and free.disk_bytes == 424 * MIB
    refusal = start(node, "job-2", 600 * MIB)
    assert refusal is not None and refusal.reason == "disk: 600 MiB asked, 424 MiB of 1 GiB free"
    assert "job-1" in executor.replicas()

    engine.run(until=HOUR + 10)
    assert host.status("job-1") is None and "job-1" not in executor.replicas()
    assert host.admission.retained == {} and host.admission.free().disk_bytes == 1 * GIB
    assert start(node, "job-2", 600 * MIB) is None


def test_a_replica_started_again_within_the_retention_period_keeps_its_files():
    engine, node, host, executor = a_node(Contribution(disk_bytes=1 * GIB, retention_s=HOUR))
    assert start(node, "job-1", 600 * MIB) is None
    engine.run(until=HOUR / 2)
    assert start(node, "job-1", 700 * MIB) is None  # its retained disk makes way for its new reservation
    assert host.admission.retained == {} and host.admission.reservations["job-1"].disk_bytes == 700 * MIB
    engine.run(until=HOUR + 10)  # the first run's removal no longer comes
    assert host.status("job-1").state is ReplicaState.STOPPED and "job-1" in executor.replicas()
    engine.run(until=HOUR / 2 + HOUR + 10)
    assert host.status("job-1") is None and "job-1" not in executor.replicas()


def test_the_retention_period_is_the_owners_a_day_by_default():
    assert Contribution().retention_s == 24 * HOUR
    assert Contribution.from_table({"retention": "2h"}).retention_s == 2 * HOUR
    assert Contribution.from_table({"retention": 90}).retention_s == 90
    assert Contribution.from_table(Contribution(retention_s=60).to_table()).retention_s == 60
    with pytest.raises(ContributionError, match=r"contribution.retention: expected a duration such as 24h or 30m"):
        Contribution.from_table({"retention": "soon"})


def test_files_an_earlier_run_left_hold_their_disk_until_their_retention_ends_counted_from_when_they_ended():
    host = ReplicaHost(Contribution(disk_bytes=1 * GIB, retention_s=HOUR))
    host.report(FilesLeft("old", 300 * MIB, age_s=HOUR - 60), 1000.0)
    host.report(FilesLeft("older", 5 * MIB, age_s=2 * HOUR), 1000.0)
    assert host.admission.retained == {"old": 300 * MIB, "older": 5 * MIB}
    assert host.admission.free().disk_bytes == 1 * GIB - 305 * MIB
    host.handle_timer(1000.0)  # past its retention already: removed at once
    assert [e for e in iter(host.next_event, None)] == [RemoveReplica("older")]
    assert host.next_deadline() == 1060.0
    host.handle_timer(1060.0)
    assert [e for e in iter(host.next_event, None)] == [RemoveReplica("old")]
    assert host.admission.retained == {} and host.files_left == set()


def test_a_replica_started_again_in_files_an_earlier_run_left_keeps_them():
    engine, node, host, executor = a_node(Contribution(disk_bytes=1 * GIB, retention_s=HOUR))
    node.call(lambda core, now: core.report(FilesLeft("job-1", 300 * MIB, age_s=60), now))
    assert host.admission.retained == {"job-1": 300 * MIB}
    assert start(node, "job-1", 600 * MIB) is None
    assert host.admission.retained == {} and host.files_left == set()
    engine.run(until=HOUR)  # the left files' removal no longer comes; the new run's comes an hour after it ends
    assert host.status("job-1").state is ReplicaState.STOPPED and "job-1" in executor.replicas()
