"""Probing this machine, and finding out which cgroups a node may write."""

import os

import psutil

from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.runtime.probe import probe_machine
from p2pdeploy.runtime.sandbox import CgroupSupport, detect_cgroups


def test_the_probe_finds_this_machines_cores_memory_disk_and_platform(tmp_path):
    machine = probe_machine(tmp_path)
    assert 0 < machine.cores <= (psutil.cpu_count() or 1)
    assert 0 < machine.memory_free_bytes <= machine.memory_total_bytes <= psutil.virtual_memory().total
    assert 0 < machine.disk_free_bytes <= machine.disk_total_bytes
    assert machine.os == "linux" and machine.arch == os.uname().machine and machine.load_1m >= 0
    attrs = machine.attributes()
    assert attrs["os"] == "linux" and attrs["cores"] == machine.cores


def test_a_contribution_larger_than_the_machine_is_clamped_to_what_the_probe_found(tmp_path):
    machine = probe_machine(tmp_path)
    generous = Contribution.from_table({"cpu": 10_000, "memory": "1000T", "disk": "1000T"}, machine)
    assert generous.cpu_cores == machine.cores
    assert generous.memory_bytes == machine.memory_total_bytes
    assert generous.disk_bytes == machine.disk_free_bytes


def test_cgroup_detection_describes_what_it_found_and_never_fails_on_an_odd_system(tmp_path):
    support = detect_cgroups()
    assert isinstance(support.describe(), str)
    for controller in ("memory", "pids", "cpu"):
        assert support.mechanism(controller) in (None, "cgroup-v1", "cgroup-v2")
    (tmp_path / "cgroup").write_text("garbage\n0::/nowhere\n")
    (tmp_path / "mountinfo").write_text("not a mountinfo line\n")
    assert detect_cgroups(proc_self=str(tmp_path)) == CgroupSupport()
    assert detect_cgroups(proc_self=str(tmp_path / "missing")) == CgroupSupport()
