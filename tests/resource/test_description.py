"""Node descriptions and matching services to them."""

from p2pdeploy.fabric.admission import Admission, Demand
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.units import GIB, MIB
from p2pdeploy.resource.description import match, node_attributes
from p2pdeploy.resource.requirements import Requirement

MACHINE = Machine(cores=4, memory_total_bytes=8 * GIB, memory_free_bytes=6 * GIB, disk_total_bytes=GIB,
                  disk_free_bytes=GIB, os="linux", arch="aarch64")  # fmt: skip


def test_a_node_is_described_by_its_machine_its_contribution_and_what_is_free():
    contribution = Contribution(cpu_cores=2, memory_bytes=GIB, tags=frozenset({"ssd"}), owner="alice")
    admission = Admission(contribution)
    admission.reserve("a", Demand(cpu_cores=1.5, memory_bytes=768 * MIB))
    attrs = node_attributes(contribution, admission.free(), MACHINE, region="eu")
    assert (attrs["os"], attrs["arch"], attrs["cores"]) == ("linux", "aarch64", 4)
    assert (attrs["cpu"], attrs["cpu_free"], attrs["memory_free"]) == (2, 0.5, 256 * MIB)
    assert attrs["tags"] == {"ssd"} and attrs["owner"] == "alice" and attrs["region"] == "eu"
    assert attrs["services_free"] == 3


def test_matching_names_the_failed_demand_and_the_failed_requirement():
    attrs = node_attributes(Contribution(cpu_cores=2, memory_bytes=GIB), Admission(Contribution(cpu_cores=0.5)).free(), MACHINE)
    result = match(attrs, Requirement.parse('arch == "x86_64"'), Demand(cpu_cores=1, memory_bytes=512 * MIB))
    assert not result.ok
    assert result.failed == ("cpu_free >= 1 (cpu_free is 0.5)", 'arch == "x86_64" (arch is "aarch64")')
    assert str(result) == 'cpu_free >= 1 (cpu_free is 0.5); arch == "x86_64" (arch is "aarch64")'
    assert match(attrs, Requirement.parse('os == "linux"'), Demand(cpu_cores=0.5)).ok


def test_the_description_layer_announces_a_new_description_only_when_it_changes():
    import dataclasses

    from p2pdeploy.resource.description import DescriptionChanged, NodeDescription

    description = NodeDescription(machine=MACHINE)  # a node that hosts nothing: its machine alone
    first = description.next_event()
    assert isinstance(first, DescriptionChanged) and first.attributes == MACHINE.attributes()
    description.set_machine(MACHINE, 1.0)
    assert description.next_event() is None  # nothing changed, nothing announced
    busier = dataclasses.replace(MACHINE, load_1m=3.5)
    description.set_machine(busier, 2.0)
    assert description.next_event() == DescriptionChanged(busier.attributes())
    assert description.attributes() == busier.attributes()


def test_availability_is_advertised_once_known_and_again_only_when_it_moved_enough():
    import pytest

    from p2pdeploy.resource.description import DescriptionChanged, NodeDescription

    description = NodeDescription(Contribution(cpu_cores=1), machine=MACHINE)
    description.next_event()
    description.set_availability(None, 0.0)
    assert description.next_event() is None  # unknown, as before
    description.set_availability(0.9, 60.0)
    first = description.next_event()
    assert isinstance(first, DescriptionChanged) and first.attributes["availability"] == 0.9
    description.set_availability(0.904, 120.0)
    assert description.next_event() is None  # a drift below the step: the prospector is spared
    assert description.attributes()["availability"] == 0.9
    description.set_availability(0.895, 180.0)  # 0.005 from what was advertised
    assert description.next_event().attributes["availability"] == 0.895
    assert Requirement.parse("availability >= 0.8").evaluate(description.attributes())
    description.set_availability(None, 240.0)
    assert "availability" not in description.next_event().attributes
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="availability must be a number in"):
            description.set_availability(bad, 300.0)
