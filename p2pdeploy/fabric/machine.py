"""What a machine is: the facts a probe found (cores, memory, disk, load, platform).

The runtime fills a :class:`Machine` from psutil (``p2pdeploy.runtime.probe``); the simulator
builds one from its scenario. The contribution is clamped to it, so a node never offers more
than it has, and its attributes are part of the node's description in the requirements
language (``os == "linux" and cores >= 4``). It is a plain value: probing is the driver's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdeploy.core import require_at_least


@dataclass(frozen=True, slots=True)
class Machine:
    #: Logical cores usable by this process (affinity and cgroup quota already applied).
    cores: float
    memory_total_bytes: int
    memory_free_bytes: int
    #: Disk where the node keeps its data directory.
    disk_total_bytes: int
    disk_free_bytes: int
    #: One-minute load average (0 where the platform has none).
    load_1m: float = 0.0
    os: str = "linux"
    arch: str = "x86_64"
    python: str = "3.11"

    def __post_init__(self) -> None:
        require_at_least(self, "machine.", 0, "cores", "memory_total_bytes", "memory_free_bytes", "disk_total_bytes",
                         "disk_free_bytes")

    def attributes(self) -> dict[str, object]:
        """The machine's facts as attributes of the requirements language."""
        return {
            "os": self.os,
            "arch": self.arch,
            "python": self.python,
            "cores": self.cores,
            "memory_total": self.memory_total_bytes,
            "machine_memory_free": self.memory_free_bytes,
            "disk_total": self.disk_total_bytes,
            "machine_disk_free": self.disk_free_bytes,
            "load": self.load_1m,
        }
