"""The executor contract: what runs a replica's process, for real or in simulation.

An executor takes **commands** and answers with **reports**, both frozen dataclasses:

=========================  ==================================================================
command                    report(s) it leads to
=========================  ==================================================================
``InstallBundle``          ``Installed(ok, reason)``: unpacked into the replica's directory
``StartProcess``           ``ProcessStarted(pid, port)`` or ``ProcessFailedToStart(reason)``;
                           later ``ProcessExited(code, signal, reason)``, exactly once
``SignalProcess``          nothing by itself; an exit follows as ``ProcessExited``
``RunHealthCheck``         ``HealthResult(ok, detail)``
``RemoveReplica``          ``Removed``: the process group is killed, files and cgroups go
(none: the executor starts) ``FilesLeft(disk_bytes, age_s)``: a replica directory an earlier
                           run of the node left, its size and how long ago its replica ended
=========================  ==================================================================

Commands only queue work (``Executor.execute`` returns at once); reports come back through the
``sink`` callable the executor was built with, on the driver's clock. Every process command and
report carries the replica's ``run`` (1 for the first start, 2 after the first restart, ...) so a
late report about an earlier run is recognised and a signal never reaches a newer process.

The commands are also the events a :class:`~p2pdeploy.fabric.supervisor.Supervisor` emits: a
driver passes them to its executor and feeds the reports back to the supervisor.

Two implementations follow this contract: ``p2pdeploy.runtime.executor.RealExecutor`` (trio,
subprocesses under rlimits and cgroups) and ``p2pdeploy.sim.executor.SimExecutor`` (virtual time,
start delays and a crash rate from a seeded stream). ``tests/fabric/test_executor_contract.py``
runs the same tests against both.

Exit reasons an executor gives, so users see the same words everywhere: ``memory limit``,
``cpu time limit``, ``file size limit``, ``exited with code N``, ``killed by signal NAME``,
``stopped by TERM``, ``killed``, and for a replica whose files outgrew its reservation
:func:`disk_reason` (``disk: the replica's files take 3.2 MiB, it reserved 1 MiB``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from p2pdeploy.core import require_at_least, require_positive
from p2pdeploy.fabric.units import format_size

REPLICA_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SIGNALS = ("TERM", "KILL")

#: Reasons for an exit, shared by both executors.
REASON_MEMORY = "memory limit"
REASON_CPU_TIME = "cpu time limit"
REASON_FILE_SIZE = "file size limit"
REASON_TERM = "stopped by TERM"
REASON_KILLED = "killed"


def check_replica_id(replica_id: str) -> str:
    """Return ``replica_id`` when it can name a directory and a cgroup; raise ``ValueError``."""
    if not isinstance(replica_id, str) or REPLICA_ID_RE.fullmatch(replica_id) is None:
        raise ValueError(
            f"replica id {replica_id!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return replica_id


def disk_reason(used_bytes: int, reserved_bytes: int) -> str:
    """Why a replica whose files (its app and data) outgrew the disk it reserved was stopped."""
    return f"disk: the replica's files take {format_size(used_bytes)}, it reserved {format_size(reserved_bytes)}"


def exit_reason(code: int | None, signal_name: str | None) -> str:
    """The words for an exit with no more specific cause."""
    if signal_name is not None:
        return f"killed by signal {signal_name}"
    return f"exited with code {code}"


# -- what to run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What a replica's processes may use; ``None`` leaves a limit to the executor's default."""

    memory_bytes: int | None = None
    cpu_cores: float | None = None
    #: RLIMIT_CPU: seconds of cpu time before SIGXCPU; only when the manifest asks for it.
    cpu_time_s: int | None = None
    open_files: int | None = None
    file_size_bytes: int | None = None
    #: Processes (and threads) of the replica at once: cgroup pids.max, or RLIMIT_NPROC.
    processes: int | None = None
    disk_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_cores", "cpu_time_s", "open_files", "file_size_bytes", "processes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"limits.{name} must be > 0 (got {value})")


@dataclass(frozen=True, slots=True)
class LogPolicy:
    """Size-capped rotating logs: ``files`` files of at most ``max_bytes`` each."""

    max_bytes: int = 1024 * 1024
    files: int = 3

    def __post_init__(self) -> None:
        require_at_least(self, "logs.", 1024, "max_bytes")
        if not 1 <= self.files <= 100:
            raise ValueError(f"logs.files must be between 1 and 100 (got {self.files})")


@dataclass(frozen=True, slots=True)
class SimulatedBehaviour:
    """How the simulated executor plays this service (the real executor ignores it).

    A simulator cannot run a program, so a manifest may describe what its program does:
    how long it takes to come up, when it exits and how, whether it ignores TERM, how much
    it logs, its peak memory (over the memory limit means a ``memory limit`` death).
    """

    start_delay_s: float | None = None
    exit_after_s: float | None = None
    exit_code: int = 0
    ignores_term: bool = False
    healthy: bool = True
    log_bytes_per_s: float = 0.0
    memory_peak_bytes: int = 0
    #: Crashes per second of uptime (exponential), on top of the executor's own rate.
    crash_rate_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One run of a replica's process."""

    replica_id: str
    run: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    #: The port the service listens on (``PORT``); ``None``: the executor assigns one.
    port: int | None = None
    limits: Limits = field(default_factory=Limits)
    logs: LogPolicy = field(default_factory=LogPolicy)
    simulated: SimulatedBehaviour | None = None

    def __post_init__(self) -> None:
        check_replica_id(self.replica_id)
        if self.run < 1:
            raise ValueError(f"run must be >= 1 (got {self.run})")
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise ValueError("argv must be a non-empty list of non-empty strings")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How to tell that a replica serves: ``tcp`` connect, ``http`` GET, a ``command``, or ``none``."""

    kind: Literal["none", "tcp", "http", "command"] = "none"
    #: Port to probe; ``None``: the replica's own port.
    port: int | None = None
    path: str = "/"
    argv: tuple[str, ...] = ()
    interval_s: float = 5.0
    timeout_s: float = 2.0
    #: Consecutive failures after which a running replica is unhealthy.
    failures: int = 3
    #: How long a starting replica may take to pass its first check.
    start_period_s: float = 30.0
    #: How often a starting replica is checked, until it passes (Docker's ``--start-interval``).
    start_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("none", "tcp", "http", "command"):
            raise ValueError(f"health.kind must be none, tcp, http or command (got {self.kind!r})")
        if self.kind == "command" and not self.argv:
            raise ValueError("health.command must be a non-empty list when health.kind is command")
        if self.kind == "http" and not self.path.startswith("/"):
            raise ValueError(f"health.path must start with / (got {self.path!r})")
        require_positive(self, "health.", "interval_s", "timeout_s", "start_period_s", "start_interval_s")
        require_at_least(self, "health.", 1, "failures")


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallBundle:
    replica_id: str
    bundle: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartProcess:
    spec: ProcessSpec

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id


@dataclass(frozen=True, slots=True)
class SignalProcess:
    replica_id: str
    run: int
    signal: Literal["TERM", "KILL"]

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be TERM or KILL (got {self.signal!r})")


@dataclass(frozen=True, slots=True)
class RunHealthCheck:
    replica_id: str
    run: int
    check: HealthCheck
    #: The port the replica was started on (from ``ProcessStarted``), for checks without their own.
    port: int | None = None


@dataclass(frozen=True, slots=True)
class RemoveReplica:
    replica_id: str


ExecutorCommand = InstallBundle | StartProcess | SignalProcess | RunHealthCheck | RemoveReplica
COMMANDS = (InstallBundle, StartProcess, SignalProcess, RunHealthCheck, RemoveReplica)


# -- reports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Installed:
    replica_id: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ProcessStarted:
    replica_id: str
    run: int
    pid: int
    port: int | None = None


@dataclass(frozen=True, slots=True)
class ProcessFailedToStart:
    replica_id: str
    run: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProcessExited:
    replica_id: str
    run: int
    #: Exit status when it exited by itself; ``None`` when a signal ended it.
    code: int | None
    #: ``"TERM"``, ``"KILL"``, ``"XCPU"``...; ``None`` when it exited by itself.
    signal: str | None
    #: In words: ``memory limit``, ``exited with code 3``, ``stopped by TERM``...
    reason: str

    @property
    def clean(self) -> bool:
        """It exited by itself with status 0."""
        return self.code == 0 and self.signal is None


@dataclass(frozen=True, slots=True)
class HealthResult:
    replica_id: str
    run: int
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Removed:
    replica_id: str


@dataclass(frozen=True, slots=True)
class FilesLeft:
    """A replica directory an earlier run of the node left (found when the executor starts):
    nothing runs in it; it takes ``disk_bytes`` and its replica ended ``age_s`` seconds ago."""

    replica_id: str
    disk_bytes: int
    age_s: float


ExecutorReport = Installed | ProcessStarted | ProcessFailedToStart | ProcessExited | HealthResult | Removed | FilesLeft
REPORTS = (Installed, ProcessStarted, ProcessFailedToStart, ProcessExited, HealthResult, Removed, FilesLeft)

ReportSink = Callable[[ExecutorReport], None]


@dataclass(frozen=True, slots=True)
class Usage:
    """What a replica uses now (as far as the executor can tell)."""

    running: bool
    pid: int | None = None
    processes: int = 0
    memory_bytes: int = 0
    cpu_time_s: float = 0.0
    #: What the replica's files (its app and data, not the node's logs of it) take on disk, as
    #: last measured (the real executor measures every ``disk_check_interval_s`` while it runs).
    disk_bytes: int = 0
    #: Limit mechanisms in force for the current run (``memory: cgroup-v1``, ``open_files: rlimit-nofile``...).
    enforced: tuple[str, ...] = ()
    #: Most processes the replica had at once in its last finished run, where a pids cgroup counted them.
    peak_processes: int | None = None


class Executor(Protocol):
    """The interface both executors implement."""

    def execute(self, command: ExecutorCommand) -> None:
        """Queue ``command``; its reports come back through the executor's sink."""

    def read_logs(self, replica_id: str, max_bytes: int) -> bytes:
        """The last ``max_bytes`` of the replica's logs (oldest first; empty when there are none)."""

    def usage(self, replica_id: str) -> Usage | None:
        """The replica's current use, or ``None`` when the executor does not know it."""

    def replicas(self) -> tuple[str, ...]:
        """Replica ids this executor holds (installed and not removed)."""
