"""Probing this machine: cores, memory, disk, load and platform, for the node's description.

The node never offers more than it has: the contribution is clamped to what this finds
(``Contribution.clamp_to(probe_machine(data_dir))``). Cores and memory take the limits this
process itself runs under into account (cpu affinity, the cgroup's cpu quota and memory
limit), so a node in a container does not offer the whole host.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import suppress
from pathlib import Path

import psutil

from p2pdeploy.fabric.machine import Machine
from p2pdeploy.runtime.sandbox import cgroup_dirs

UNLIMITED = 1 << 60


def probe_machine(data_dir: str | os.PathLike[str] = ".") -> Machine:
    """What this machine offers, measured now."""
    cores = float(_usable_cores())
    memory = psutil.virtual_memory()
    memory_limit = _cgroup_memory_limit()
    memory_total = min(memory.total, memory_limit) if memory_limit else memory.total
    disk_path = Path(data_dir)
    while not disk_path.exists() and disk_path != disk_path.parent:
        disk_path = disk_path.parent
    disk = psutil.disk_usage(str(disk_path))
    try:
        load_1m = os.getloadavg()[0]
    except OSError:
        load_1m = 0.0
    return Machine(
        cores=cores,
        memory_total_bytes=int(memory_total),
        memory_free_bytes=int(min(memory.available, memory_total)),
        disk_total_bytes=int(disk.total),
        disk_free_bytes=int(disk.free),
        load_1m=float(load_1m),
        os=platform.system().lower(),
        arch=platform.machine(),
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
    )


def _usable_cores() -> float:
    try:
        cores: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = psutil.cpu_count(logical=True) or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(quota, 0.01))
    return cores


def _ancestors(directory: str, mount_point: str) -> list[str]:
    """``directory`` and its parents up to the hierarchy's mount point: a limit on any applies."""
    found = [directory]
    while os.path.normpath(directory) != os.path.normpath(mount_point) and directory != os.path.dirname(directory):
        directory = os.path.dirname(directory)
        found.append(directory)
    return found


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cgroup_memory_limit() -> int | None:
    v2, v1 = cgroup_dirs()
    files = []
    if v2 is not None:
        files += [os.path.join(d, "memory.max") for d in _ancestors(*v2)]
    if "memory" in v1:
        files += [os.path.join(d, "memory.limit_in_bytes") for d in _ancestors(*v1["memory"])]
    limits = []
    for path in files:
        with suppress(TypeError, ValueError):
            value = int(_read(path))  # type: ignore[arg-type]  # "max" or a missing file: no limit
            if 0 < value < UNLIMITED:
                limits.append(value)
    return min(limits) if limits else None


def _cgroup_cpu_quota() -> float | None:
    v2, v1 = cgroup_dirs()
    quotas = []
    if v2 is not None:
        for directory in _ancestors(*v2):
            quota, _, period = (_read(os.path.join(directory, "cpu.max")) or "max").partition(" ")
            with suppress(ValueError):
                if quota != "max":
                    quotas.append(int(quota) / int(period or "100000"))
    if "cpu" in v1:
        for directory in _ancestors(*v1["cpu"]):
            with suppress(TypeError, ValueError):
                quota_us = int(_read(os.path.join(directory, "cpu.cfs_quota_us")))  # type: ignore[arg-type]
                period_us = int(_read(os.path.join(directory, "cpu.cfs_period_us")))  # type: ignore[arg-type]
                if quota_us > 0 and period_us > 0:
                    quotas.append(quota_us / period_us)
    return min(quotas) if quotas else None
