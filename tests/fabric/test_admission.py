"""Admission control: the ledger refuses what would exceed the contribution, and says why."""

from p2pdeploy.fabric.admission import Admission, Demand
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.units import GIB, MIB

ONE_CORE = Demand(cpu_cores=1, memory_bytes=256 * MIB, disk_bytes=64 * MIB)


def test_with_two_cores_offered_a_third_one_core_replica_is_refused_with_the_reason():
    admission = Admission(Contribution(cpu_cores=2, memory_bytes=4 * GIB, max_services=8))
    assert admission.reserve("a", ONE_CORE) is None
    assert admission.reserve("b", ONE_CORE) is None
    refusal = admission.reserve("c", ONE_CORE)
    assert refusal is not None and refusal.resource == "cpu"
    assert str(refusal) == "cpu: 1 core asked, 0 of 2 free"
    assert "c" not in admission.reservations


def test_releasing_a_reservation_makes_room_again():
    admission = Admission(Contribution(cpu_cores=2, max_services=8))
    admission.reserve("a", ONE_CORE)
    admission.reserve("b", ONE_CORE)
    assert admission.release("a") == ONE_CORE
    assert admission.reserve("c", ONE_CORE) is None
    assert admission.release("missing") is None


def test_fractional_cores_add_up_without_rounding_errors():
    admission = Admission(Contribution(cpu_cores=0.3, max_services=8))
    for name in ("a", "b", "c"):
        assert admission.reserve(name, Demand(cpu_cores=0.1)) is None
    assert str(admission.reserve("d", Demand(cpu_cores=0.1))) == "cpu: 0.1 cores asked, 0 of 0.3 free"


def test_memory_disk_bandwidth_and_service_count_each_refuse_with_their_numbers():
    c = Contribution(cpu_cores=8, memory_bytes=GIB, disk_bytes=GIB, bandwidth_bps=10_000_000, max_services=2)
    admission = Admission(c)
    assert str(admission.admit(Demand(memory_bytes=2 * GIB))) == "memory: 2 GiB asked, 1 GiB of 1 GiB free"
    assert str(admission.admit(Demand(disk_bytes=1536 * MIB))) == "disk: 1.5 GiB asked, 1 GiB of 1 GiB free"
    assert str(admission.admit(Demand(bandwidth_bps=20_000_000))) == (
        "bandwidth: 20 Mbit/s asked, 10 Mbit/s of 10 Mbit/s free"
    )
    admission.reserve("a", Demand())
    admission.reserve("b", Demand())
    assert str(admission.admit(Demand())) == "services: 2 of 2 running (the owner's max_services)"


def test_tags_are_checked_before_amounts():
    admission = Admission(Contribution(cpu_cores=0, allowed_tags=frozenset({"web"})))
    refusal = admission.admit(Demand(cpu_cores=1, tags=frozenset({"mining"})))
    assert refusal.resource == "tags"


def test_one_replica_holds_one_reservation():
    admission = Admission(Contribution(cpu_cores=2, max_services=8))
    admission.reserve("a", Demand())
    assert str(admission.reserve("a", Demand())) == "replica: a already holds a reservation on this node"
    free = admission.free()
    assert (free.cpu_cores, free.services) == (2, 7)
