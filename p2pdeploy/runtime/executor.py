"""The real executor: service processes on this machine, confined, logged, watched, stopped.

It follows the contract of :mod:`p2pdeploy.fabric.executor` (commands in, reports out through
a sink) on trio:

- ``InstallBundle`` unpacks the bundle (checked, see ``exec_unpack``) into
  ``<data_dir>/replicas/<id>/app``; the replica's writable ``data`` directory and its ``logs``
  sit next to it. On a root node each replica has a uid (and gid) of its own, kept across
  restarts by its data directory's owner; ``replicas`` is 0711, the replica's directory the
  node's with mode 0710 for the replica's group, ``data`` the replica's with mode 0700, so no
  service reads another's files, nor (per uid) its ``/proc/PID/environ``.
- ``StartProcess`` runs the service's command through the launcher (``sandbox.py``) in a new
  session, so the whole process group can be signalled: cgroups per run where this node may
  write them (memory, pids, cpu), rlimits for the rest (RLIMIT_AS for memory when no cgroup
  limits it, RLIMIT_CPU when asked, RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_NPROC), as the
  replica's unprivileged uid when the node runs as root, with the environment
  ``PORT``, ``P2PDEPLOY_DATA_DIR``, ``P2PDEPLOY_REPLICA_ID``, ``HOME``, the service's own
  variables and bindings, and what the node adds (``P2PDEPLOY_STATE_URL`` and
  ``P2PDEPLOY_STATE_TOKEN``, see ``p2pdeploy.runtime.state_api``). stdout and stderr go to size-capped rotating logs.
- When the process exits (seen on a pidfd, before it is reaped, so its process group id cannot
  be reused meanwhile) every other process of its group and cgroups is killed, then it is
  reaped and the exit reported with its reason: ``memory limit`` (the cgroup's OOM counter,
  or a ``MemoryError`` under RLIMIT_AS), ``cpu time limit``, ``file size limit``,
  ``stopped by TERM``, ``killed``, ``exited with code N``...
- ``SignalProcess`` sends TERM or KILL to the process group (KILL to the cgroups too);
  ``RunHealthCheck`` runs a TCP, HTTP or command check; ``RemoveReplica`` kills what is left
  and deletes the replica's files.
- Disk: every ``disk_check_interval_s`` a worker thread measures what each running replica's
  files take (``app`` and ``data``, with its ``tmp``; not the node's rotated ``logs``): a walk
  of at most ``max_counted_entries`` entries that counts allocated blocks (``st_blocks * 512``,
  each hard-linked inode once) and never follows a link. ``usage()`` reports the last
  measure. A replica whose files take more than its ``disk`` reservation (``Limits.disk_bytes``)
  is killed and its exit reported with :func:`~p2pdeploy.fabric.executor.disk_reason`
  (``disk: the replica's files take 3.2 MiB, it reserved 1 MiB``); the supervisor's restart
  policy then applies, and a restart is refused with the same reason (``ProcessFailedToStart``)
  while the files still take too much, so the replica gives up after its ``max_restarts``.
- When a run ends, the executor touches ``stopped`` in the replica's directory. When the
  executor starts, it reports each replica directory an earlier run of the node left as
  ``FilesLeft`` (all its files, measured the same way, and how long ago its replica ended: the
  newest time among the directory, ``stopped`` and its logs), so the core counts them against
  the contribution's disk and removes them when the owner's retention period ends.

When the executor is cancelled (the node stops) every replica's processes are killed and
reaped under a shielded scope: no process outlives the node that started it. A node killed
outright cannot do that; where cgroups are available the next executor to start on the machine
kills what the dead node's replicas left and removes their cgroups. It makes no
decision about restarts or health thresholds: that is the supervisor's.
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import trio

from p2pdeploy.core import require_at_least, require_positive
from p2pdeploy.fabric.executor import (
    REASON_CPU_TIME,
    REASON_FILE_SIZE,
    REASON_KILLED,
    REASON_MEMORY,
    REASON_TERM,
    ExecutorCommand,
    ExecutorReport,
    FilesLeft,
    HealthResult,
    InstallBundle,
    Installed,
    LogPolicy,
    ProcessExited,
    ProcessFailedToStart,
    ProcessSpec,
    ProcessStarted,
    Removed,
    RemoveReplica,
    ReportSink,
    RunHealthCheck,
    SignalProcess,
    StartProcess,
    Usage,
    check_replica_id,
    disk_reason,
    exit_reason,
)
from p2pdeploy.resource.bundle import MAX_UNPACKED_BYTES, BundleError
from p2pdeploy.runtime import sandbox
from p2pdeploy.runtime.exec_health import check_command, check_http, check_tcp, open_in_session
from p2pdeploy.runtime.exec_logs import RotatingLog, read_tail
from p2pdeploy.runtime.exec_unpack import unpack_bundle
from p2pdeploy.runtime.sandbox import (
    CgroupLimits,
    CgroupSupport,
    ReplicaCgroup,
    detect_cgroups,
    sweep_stale_cgroups,
)

log = logging.getLogger(__name__)

SANDBOX_SCRIPT = str(Path(sandbox.__file__).resolve())
DEFAULT_SERVICE_UIDS = (0x7000_0000, 0x7000_FFFF)
MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")
FILE_SIZE_MARKERS = (b"File too large",)
STDERR_TAIL_BYTES = 8192
#: Touched in a replica's directory whenever a run of it ends (when its files were last in use).
STOPPED_MARK = "stopped"


@dataclass(frozen=True, slots=True)
class RealExecutorConfig:
    #: The node's data directory; replicas live in ``<data_dir>/replicas/<id>/``.
    data_dir: Path
    #: Where replicas live instead, e.g. ``/var/lib/p2pdeploy/replicas`` for a root node whose
    #: data directory (under ``/root``) the unprivileged service user could not traverse.
    replicas_dir: Path | None = None
    #: Create a cgroup per replica run where this node may (never fails when it may not).
    use_cgroups: bool = True
    #: Who services run as: ``"auto"`` (on a root node, a uid per replica from
    #: ``service_uid_range``; else the node's user), a user name or a uid every replica shares,
    #: or ``None`` (the node's user, even root).
    service_user: str | int | None = "auto"
    #: Where a root node takes each replica's uid (and gid, the same number) from: ``[first, last]``,
    #: no passwd entry needed; ``None``: every replica runs as ``nobody``. A uid of its own keeps a
    #: service out of the others' ``/proc/PID/environ`` (their state tokens), processes and files,
    #: and makes RLIMIT_NPROC a per-replica limit. The default is 65,536 uids from 0x70000000, a
    #: band systemd's table of uid ranges leaves unused (above container ranges, below 2**31).
    service_uid_range: tuple[int, int] | None = DEFAULT_SERVICE_UIDS
    #: RLIMIT_AS for memory: ``auto`` (only when no cgroup limits memory), ``always``, ``never``.
    memory_rlimit: Literal["auto", "always", "never"] = "auto"
    #: PATH for services; ``None``: a safe default when root, the node's PATH otherwise.
    service_path: str | None = None
    default_open_files: int = 1024
    default_processes: int = 256
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES
    #: How long ``RemoveReplica`` waits for a killed process before deleting its files anyway.
    remove_wait_s: float = 5.0
    #: After an exit, how long to keep reading what is left in the pipes.
    drain_s: float = 1.0
    cgroup_prefix: str = "p2pdeploy"
    #: Interpreter that runs the launcher (before it execs the service).
    launcher_python: str = sys.executable
    #: How often the files of each running replica are measured against its ``disk`` reservation
    #: (in a worker thread); a replica that writes past it is stopped within about this long.
    disk_check_interval_s: float = 10.0
    #: Most directory entries one measure walks: a replica with more files than this is stopped
    #: (``disk: ... more than N files``), so a flood of empty files cannot make the walk endless.
    max_counted_entries: int = 200_000

    def __post_init__(self) -> None:
        require_positive(self, "executor.", "disk_check_interval_s")
        require_at_least(self, "executor.", 1, "max_counted_entries")


@dataclass(eq=False)
class _Replica:
    replica_id: str
    root: Path
    lock: trio.Lock = field(default_factory=trio.Lock)
    installed: bool = False
    log_policy: LogPolicy = field(default_factory=LogPolicy)
    run: int = 0
    alive: bool = False
    pid: int | None = None
    port: int | None = None
    process: Any = None
    cgroup: ReplicaCgroup | None = None
    log: RotatingLog | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    enforced: dict[str, str] = field(default_factory=dict)
    rlimit_as: bool = False
    uid: int | None = None
    gid: int | None = None
    peak_processes: int | None = None
    #: What its app and data took at the last measure, and the disk its current run reserved.
    disk_bytes: int = 0
    disk_limit: int | None = None
    #: Why the executor killed the current run for its files (``disk: ...``), if it did.
    over_disk: str | None = None
    signals_sent: set[str] = field(default_factory=set)
    stderr_tail: bytearray = field(default_factory=bytearray)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def counted_dirs(self) -> tuple[Path, Path]:
        """What counts against the replica's ``disk``: its app and what it writes (the node's
        logs of it are capped by its log policy instead)."""
        return self.app_dir, self.data_dir


def service_ids(user: str | int | None) -> tuple[int | None, int | None]:
    """The (uid, gid) services run as for a ``service_user`` setting."""
    if user == "auto":
        if os.geteuid() != 0:
            return None, None
        user = "nobody"
    if user is None:
        return None, None
    if isinstance(user, int):
        return user, user
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def service_user_cannot_enter(root: Path, uid: int | None, gid: int | None) -> str | None:
    """Why services running as ``uid`` could not enter ``root`` (a directory on the way), or None.

    A directory this process cannot stat (not made yet, or out of its reach) is not held against
    the service user: what goes wrong there is reported by whatever touches it next.
    """
    if uid is None:
        return None
    for directory in [*reversed(root.parents), root]:
        try:
            info = directory.stat()
        except OSError:
            return None
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif gid is not None and info.st_gid == gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return f"{directory} (mode {info.st_mode & 0o777:o}) cannot be entered by the service user (uid {uid})"
    return None


class RealExecutor:
    """Runs replicas as confined subprocesses. Use it through :func:`open_executor`."""

    def __init__(
        self,
        config: RealExecutorConfig,
        sink: ReportSink,
        *,
        environment: Callable[[ProcessSpec], Mapping[str, str]] | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        #: Variables the node adds to each run's environment (the state API's URL and token).
        self.extra_environment = environment
        self.root = Path(config.replicas_dir) if config.replicas_dir is not None else Path(config.data_dir) / "replicas"
        self.support: CgroupSupport = detect_cgroups() if config.use_cgroups else CgroupSupport()
        self.uid, self.gid = service_ids(config.service_user)
        self._replicas: dict[str, _Replica] = {}
        self._nursery: trio.Nursery | None = None

    # -- lifetime --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve commands until cancelled; then kill every replica's processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # services pass through to their own directory; none lists the others
        if self.support.available:  # a node that died without cleaning up left these running
            for directory in sweep_stale_cgroups(self.support, self.config.cgroup_prefix):
                log.warning("killed the processes of a dead node's replica and removed %s", directory)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._report_files_left)
            nursery.start_soon(self._watch_disk)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for replica in self._replicas.values():
                    self._kill_all(replica)

    # -- the contract ----------------------------------------------------------------------
    def execute(self, command: ExecutorCommand) -> None:
        if self._nursery is None:
            raise RuntimeError("the executor is not running; use it inside `async with open_executor(...)`")
        self._nursery.start_soon(self._handle, command)

    def read_logs(self, replica_id: str, max_bytes: int) -> bytes:
        replica = self._replicas.get(replica_id)
        if replica is None or max_bytes <= 0:
            return b""
        return read_tail(replica.log_dir, max_bytes, replica.log_policy.files)

    def usage(self, replica_id: str) -> Usage | None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return None
        pids = self._pids(replica)
        memory = 0
        cpu = 0.0
        for pid in pids:
            with suppress(psutil.Error):
                process = psutil.Process(pid)
                memory += process.memory_info().rss
                times = process.cpu_times()
                cpu += times.user + times.system
        return Usage(
            running=replica.alive,
            pid=replica.pid if replica.alive else None,
            processes=len(pids),
            memory_bytes=memory,
            cpu_time_s=cpu,
            disk_bytes=replica.disk_bytes,
            enforced=tuple(f"{what}: {how}" for what, how in sorted(replica.enforced.items())),
            peak_processes=replica.peak_processes,
        )

    def replicas(self) -> tuple[str, ...]:
        return tuple(r.replica_id for r in self._replicas.values() if r.installed)

    def disk_bytes(self, replica_id: str) -> int | None:
        """What the replica's files took at the last measure (``usage().disk_bytes`` without
        asking about its processes); ``None`` for a replica this executor does not hold."""
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.disk_bytes

    def pids(self, replica_id: str) -> set[int]:
        """Every live process of the replica (its process group and cgroups)."""
        replica = self._replicas.get(replica_id)
        return self._pids(replica) if replica is not None else set()

    def replica_dir(self, replica_id: str) -> Path:
        return self.root / check_replica_id(replica_id)

    # -- dispatch --------------------------------------------------------------------------
    def _report(self, report: ExecutorReport) -> None:
        try:
            self.sink(report)
        except Exception:  # a broken sink must not take the executor down with it
            log.exception("the executor's sink failed on %s", type(report).__name__)

    async def _handle(self, command: ExecutorCommand) -> None:
        try:
            if isinstance(command, InstallBundle):
                await self._install(command)
            elif isinstance(command, StartProcess):
                await self._start(command.spec)
            elif isinstance(command, SignalProcess):
                self._signal(command)
            elif isinstance(command, RunHealthCheck):
                await self._health(command)
            elif isinstance(command, RemoveReplica):
                await self._remove(command.replica_id)
        except Exception as exc:
            log.exception("executor command %s failed", type(command).__name__)
            if isinstance(command, InstallBundle):
                self._report(Installed(command.replica_id, False, f"install failed: {exc}"))
            elif isinstance(command, StartProcess):
                self._report(ProcessFailedToStart(command.replica_id, command.spec.run, f"start failed: {exc}"))
            elif isinstance(command, RunHealthCheck):
                self._report(HealthResult(command.replica_id, command.run, False, f"health check failed: {exc}"))

    def _replica(self, replica_id: str) -> _Replica:
        replica = self._replicas.get(replica_id)
        if replica is None:
            replica = _Replica(replica_id, self.replica_dir(replica_id))
            replica.uid, replica.gid = self._ids_for_new_replica(replica)
            self._replicas[replica_id] = replica
        return replica

    @property
    def uid_per_replica(self) -> bool:
        """Whether each replica runs as a uid of its own (a root node, ``service_user="auto"``)."""
        return self.config.service_uid_range is not None and self.config.service_user == "auto" and os.geteuid() == 0

    def _ids_for_new_replica(self, replica: _Replica) -> tuple[int | None, int | None]:
        """The replica's uid and gid (equal). The owner of its data directory when it has one from
        an earlier run in the range and no other replica holds it, so a restarted node gives a
        replica back its files; else the first free uid from a point of the range that the hash of
        the replica's directory picks (two nodes on one machine rarely meet), free meaning that no
        replica here, no replica directory left on disk, no user or group of the system and no
        process holds it. A removed replica's uid is free again."""
        if not self.uid_per_replica:
            return self.uid, self.gid
        assert self.config.service_uid_range is not None
        first, last = self.config.service_uid_range
        taken = {r.uid for r in self._replicas.values()}
        previous = _owner(replica.data_dir)
        if previous is not None and first <= previous <= last and previous not in taken:
            return previous, previous
        taken |= self._uids_on_disk() | {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
        size = last - first + 1
        start = int.from_bytes(hashlib.sha256(os.fsencode(replica.root)).digest()[:8], "big") % size
        for offset in range(size):
            uid = first + (start + offset) % size
            if uid not in taken and not _known_id(uid):
                return uid, uid
        raise ValueError(f"every uid of service_uid_range {first}-{last} is in use")

    def _uids_on_disk(self) -> set[int]:
        """The uids of the replica directories under the executor's root (stopped replicas' too)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return set()
        owners = (_owner(self.root / name / "data") for name in names)
        return {uid for uid in owners if uid is not None}

    def isolation(self) -> str:
        """What this node can and cannot keep services from doing to each other, in one line."""
        if self.uid_per_replica:
            assert self.config.service_uid_range is not None
            first, last = self.config.service_uid_range
            return (f"isolation: each replica runs as a uid of its own ({first}-{last}); "
                    "a service cannot read another's environment, processes or files, nor the node's")
        if self.uid is not None:
            return (f"isolation: every replica runs as uid {self.uid}: services cannot read the node's files, "
                    "but can read each other's environment (state tokens) and files")
        advice = "" if os.geteuid() == 0 else "; run the node as root for a uid per replica"
        return (f"isolation: none between services: they run as this node's user (uid {os.geteuid()}), so they "
                f"can read each other's environment (state tokens) and files, and the node's{advice}")

    # -- install ---------------------------------------------------------------------------
    async def _install(self, command: InstallBundle) -> None:
        try:
            replica = self._replica(command.replica_id)
        except ValueError as exc:
            self._report(Installed(command.replica_id, False, str(exc)))
            return
        async with replica.lock:
            if replica.alive:
                self._report(Installed(replica.replica_id, False, f"replica {replica.replica_id} is running; stop it first"))
                return
            problem = service_user_cannot_enter(self.root, replica.uid, replica.gid)  # its own is made below
            if problem is not None:
                problem += "; use a data directory others can traverse, or set service_user"
                self._report(Installed(replica.replica_id, False, problem))
                return
            try:
                await trio.to_thread.run_sync(self._install_files, replica, command.bundle)
            except BundleError as exc:
                self._report(Installed(replica.replica_id, False, str(exc)))
                return
            replica.installed = True
        self._report(Installed(replica.replica_id, True))

    def _install_files(self, replica: _Replica, bundle: bytes) -> None:
        """The replica's directory: ``app`` (the bundle) and ``logs`` are the node's, ``data`` (with
        ``tmp``) the service's, mode 0700. The directory itself stays the node's (mode 0710, group
        the service's): a service that owned it could swap ``logs`` for a link to a directory of
        root's, where the node would then write the service's output."""
        replica.root.mkdir(parents=True, exist_ok=True)
        if replica.uid is not None:
            os.chown(replica.root, os.geteuid(), replica.gid if replica.gid is not None else -1)
        replica.root.chmod(0o710 if replica.uid is not None else 0o700)
        unpack_bundle(bundle, replica.app_dir, max_unpacked_bytes=self.config.max_unpacked_bytes)
        replica.log_dir.mkdir(exist_ok=True)
        replica.log_dir.chmod(0o750)  # the service cannot rewrite its own logs
        replica.data_dir.mkdir(mode=0o700, exist_ok=True)
        if replica.uid is not None:
            _hand_over(replica.data_dir, replica.uid, replica.gid if replica.gid is not None else -1)
        replica.data_dir.chmod(0o700)
        tmp = replica.data_dir / "tmp"
        if not tmp.is_symlink() and not tmp.exists():  # the service's own directory: what it made there stays
            tmp.mkdir(mode=0o700)
            if replica.uid is not None:
                os.chown(tmp, replica.uid, replica.gid if replica.gid is not None else -1, follow_symlinks=False)
        replica.disk_bytes, _ = files_size(replica.counted_dirs, self.config.max_counted_entries)

    # -- start -----------------------------------------------------------------------------
    async def _start(self, spec: ProcessSpec) -> None:
        replica = self._replicas.get(spec.replica_id)
        if replica is None or not replica.installed:
            self._report(ProcessFailedToStart(spec.replica_id, spec.run, "not installed"))
            return
        async with replica.lock:
            if replica.alive:
                self._report(ProcessFailedToStart(spec.replica_id, spec.run, f"already running (run {replica.run})"))
                return
            if self._nursery is None:
                return
            reserved = spec.limits.disk_bytes
            if reserved is not None and replica.disk_bytes > reserved:  # files it left last run: still there?
                over = await self._measure(replica, reserved)
                if over is not None:
                    self._report(ProcessFailedToStart(spec.replica_id, spec.run, over))
                    return
            port = spec.port or self._pick_port(replica.port)
            env = self._environment(replica, spec, port)
            cgroup, enforced = self._cgroup_for(spec)
            rlimits, rlimit_as = self._rlimits(spec, enforced, replica.uid)
            plan = {
                "argv": list(spec.argv),
                "env": env,
                "cwd": str(replica.app_dir),
                "cgroup_procs": cgroup.procs_files if cgroup is not None else [],
                "rlimits": rlimits,
                "uid": replica.uid,
                "gid": replica.gid,
                "umask": 0o027,
            }
            replica.log = RotatingLog(replica.log_dir, spec.logs)
            replica.log_policy = spec.logs
            try:
                process = await open_in_session(
                    self._launcher(), sandbox.LAUNCHER_ENVIRONMENT, json.dumps(plan).encode(), subprocess.PIPE
                )
            except OSError as exc:
                replica.log.close()
                if cgroup is not None:
                    cgroup.remove()
                self._report(ProcessFailedToStart(spec.replica_id, spec.run, f"cannot start the launcher: {exc.strerror}"))
                return
            pidfd = os.pidfd_open(process.pid)
            replica.run = spec.run
            replica.alive = True
            replica.pid = process.pid
            replica.port = port
            replica.process = process
            replica.cgroup = cgroup
            replica.plan = plan
            replica.enforced = enforced
            replica.rlimit_as = rlimit_as
            replica.disk_limit = reserved
            replica.over_disk = None
            replica.signals_sent = set()
            replica.stderr_tail = bytearray()
            replica.exited = trio.Event()
            self._nursery.start_soon(self._watch, replica, process, pidfd, spec.run)
        self._report(ProcessStarted(spec.replica_id, spec.run, process.pid, port))

    def _launcher(self) -> list[str]:
        """The launcher's command line; its plan goes to its standard input (see ``sandbox``)."""
        return [self.config.launcher_python, "-I", "-S", SANDBOX_SCRIPT]

    def _environment(self, replica: _Replica, spec: ProcessSpec, port: int) -> dict[str, str]:
        path = self.config.service_path
        if path is None:
            path = sandbox.SAFE_PATH if os.geteuid() == 0 else os.environ.get("PATH", sandbox.SAFE_PATH)
        env = {
            "PATH": path,
            "HOME": str(replica.data_dir),
            "TMPDIR": str(replica.data_dir / "tmp"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(spec.env)
        if self.extra_environment is not None:
            env.update(self.extra_environment(spec))
        env.update(
            PORT=str(port),
            P2PDEPLOY_DATA_DIR=str(replica.data_dir),
            P2PDEPLOY_REPLICA_ID=spec.replica_id,
        )
        return env

    def _cgroup_for(self, spec: ProcessSpec) -> tuple[ReplicaCgroup | None, dict[str, str]]:
        if not self.support.available:
            return None, {}
        limits = spec.limits
        name = f"{self.config.cgroup_prefix}-{os.getpid()}-{spec.replica_id}-{spec.run}"
        cgroup = ReplicaCgroup.create(
            self.support,
            name,
            CgroupLimits(
                memory_bytes=limits.memory_bytes,
                processes=limits.processes or self.config.default_processes,
                cpu_cores=limits.cpu_cores,
            ),
        )
        if not cgroup.directories:
            return None, {}
        return cgroup, dict(cgroup.enforced)

    def _rlimits(
        self, spec: ProcessSpec, enforced: dict[str, str], service_uid: int | None
    ) -> tuple[dict[str, tuple[int, int]], bool]:
        limits = spec.limits
        rlimits: dict[str, tuple[int, int]] = {"CORE": (0, 0)}
        open_files = limits.open_files or self.config.default_open_files
        rlimits["NOFILE"] = (open_files, open_files)
        enforced["open_files"] = "rlimit-nofile"
        if limits.file_size_bytes is not None:
            rlimits["FSIZE"] = (limits.file_size_bytes, limits.file_size_bytes)
            enforced["file_size"] = "rlimit-fsize"
        if limits.cpu_time_s is not None:
            rlimits["CPU"] = (limits.cpu_time_s, limits.cpu_time_s + 5)  # SIGXCPU, then SIGKILL 5 s later
            enforced["cpu_time"] = "rlimit-cpu"
        rlimit_as = False
        mode = self.config.memory_rlimit
        if limits.memory_bytes is not None and (mode == "always" or (mode == "auto" and "memory" not in enforced)):
            rlimits["AS"] = (limits.memory_bytes, limits.memory_bytes)
            enforced["memory"] = f"{enforced['memory']}+rlimit-as" if "memory" in enforced else "rlimit-as"
            rlimit_as = True
        if "processes" not in enforced:
            uid = service_uid if service_uid is not None else os.getuid()
            if uid == 0:
                enforced["processes"] = "none (root ignores RLIMIT_NPROC and no pids cgroup is writable)"
            else:
                # RLIMIT_NPROC counts every process of the uid: allow this many more than it has now
                allowed = _processes_of(uid) + (limits.processes or self.config.default_processes)
                rlimits["NPROC"] = (allowed, allowed)
                enforced["processes"] = f"rlimit-nproc (uid {uid})"
        return rlimits, rlimit_as

    @staticmethod
    def _pick_port(previous: int | None) -> int:
        """The replica's previous port when it is still free (clients keep it), else a fresh one."""
        for candidate in ([previous] if previous else []) + [0]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
                try:
                    probe.bind(("", candidate))
                except OSError:
                    continue
                return probe.getsockname()[1]
        raise OSError("no free port")

    # -- watching a run --------------------------------------------------------------------
    async def _watch(self, replica: _Replica, process: Any, pidfd: int, run: int) -> None:
        outcome: tuple[int | None, str | None, str] | None = None
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(self._pump, replica, process.stdout, False)
                pumps.start_soon(self._pump, replica, process.stderr, True)
                try:
                    await trio.lowlevel.wait_readable(pidfd)
                finally:
                    # The leader has exited (or we are shutting down) but is not reaped: its
                    # group id is still reserved, so killing the group hits only its processes.
                    with trio.CancelScope(shield=True):
                        self._kill_all(replica)
                        code = await process.wait()
                pumps.cancel_scope.deadline = trio.current_time() + self.config.drain_s
            outcome = self._classify(replica, code)  # before the cgroup (and its OOM counter) goes
            if replica.cgroup is not None:
                replica.peak_processes = replica.cgroup.peak_processes()
        finally:
            os.close(pidfd)
            with trio.CancelScope(shield=True):
                await self._release_run(replica)
        replica.exited.set()
        self._report(ProcessExited(replica.replica_id, run, *outcome))

    async def _release_run(self, replica: _Replica) -> None:
        replica.alive = False
        with suppress(OSError):
            (replica.root / STOPPED_MARK).touch()  # when its files were last in use, for a restarted node
        if replica.log is not None:
            replica.log.close()
            replica.log = None
        cgroup = replica.cgroup
        if cgroup is not None:
            for _ in range(50):  # dying processes leave the cgroup a moment after SIGKILL
                cgroup.kill()
                if cgroup.remove():
                    break
                await trio.sleep(0.02)

    async def _pump(self, replica: _Replica, stream: Any, is_stderr: bool) -> None:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                return
            if is_stderr:
                tail = replica.stderr_tail
                tail += chunk
                if len(tail) > STDERR_TAIL_BYTES:
                    del tail[: len(tail) - STDERR_TAIL_BYTES]
            if replica.log is not None:
                try:
                    replica.log.write(chunk)
                except OSError as exc:
                    log.warning("cannot write the logs of %s: %s", replica.replica_id, exc)

    def _classify(self, replica: _Replica, code: int) -> tuple[int | None, str | None, str]:
        signal_name = None
        code_out: int | None = code
        if code < 0:
            code_out = None
            try:
                signal_name = signal.Signals(-code).name.removeprefix("SIG")
            except ValueError:
                signal_name = str(-code)
        tail = bytes(replica.stderr_tail)
        oom_kills = replica.cgroup.oom_kills() if replica.cgroup is not None else 0
        sent = replica.signals_sent
        if replica.over_disk is not None:
            reason = replica.over_disk
        elif oom_kills > 0 or (replica.rlimit_as and any(marker in tail for marker in MEMORY_MARKERS)):
            reason = REASON_MEMORY
        elif signal_name == "XCPU":
            reason = REASON_CPU_TIME
        elif signal_name == "XFSZ" or ("file_size" in replica.enforced and any(m in tail for m in FILE_SIZE_MARKERS)):
            reason = REASON_FILE_SIZE
        elif signal_name == "TERM" and "TERM" in sent:
            reason = REASON_TERM
        elif signal_name == "KILL" and "KILL" in sent:
            reason = REASON_KILLED
        elif code == sandbox.LAUNCHER_FAILED and sandbox.LAUNCHER_MARK.encode() in tail:
            line = tail.split(sandbox.LAUNCHER_MARK.encode(), 1)[1].split(b"\n", 1)[0]
            reason = line.decode(errors="replace").strip()
        elif signal_name is None and "TERM" in sent:
            reason = f"{REASON_TERM} (exited with code {code})"
        else:
            reason = exit_reason(code_out, signal_name)
        return code_out, signal_name, reason

    # -- signals, health, removal ----------------------------------------------------------
    def _signal(self, command: SignalProcess) -> None:
        replica = self._replicas.get(command.replica_id)
        if replica is None or not replica.alive or replica.run != command.run or replica.pid is None:
            return
        replica.signals_sent.add(command.signal)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(replica.pid, signal.SIGTERM if command.signal == "TERM" else signal.SIGKILL)
        if command.signal == "KILL" and replica.cgroup is not None:
            replica.cgroup.kill()

    def _kill_all(self, replica: _Replica) -> None:
        if replica.alive and replica.pid is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(replica.pid, signal.SIGKILL)
        if replica.cgroup is not None:
            replica.cgroup.kill()

    def _pids(self, replica: _Replica) -> set[int]:
        pids = replica.cgroup.pids() if replica.cgroup is not None and replica.alive else set()
        if replica.alive and replica.pid is not None:
            for process in psutil.process_iter(["pid"]):
                with suppress(psutil.Error, ProcessLookupError):  # it may exit between listing and asking
                    if os.getpgid(process.pid) == replica.pid:
                        pids.add(process.pid)
        return pids

    # -- disk ------------------------------------------------------------------------------
    async def _measure(self, replica: _Replica, reserved: int) -> str | None:
        """Measure the replica's files (in a worker thread); why they are too many, or None."""
        # a walk only reads: a node that stops need not wait for it
        used, complete = await trio.to_thread.run_sync(
            files_size, replica.counted_dirs, self.config.max_counted_entries, abandon_on_cancel=True
        )
        replica.disk_bytes = used
        if not complete:
            return f"disk: the replica has more than {self.config.max_counted_entries} files, more than a node counts"
        return disk_reason(used, reserved) if used > reserved else None

    async def _watch_disk(self) -> None:
        """Measure each running replica's files every ``disk_check_interval_s``, one at a time;
        kill a run whose files outgrew its reservation (its exit then carries the reason)."""
        while True:
            await trio.sleep(self.config.disk_check_interval_s)
            for replica in list(self._replicas.values()):
                if not replica.alive or replica.disk_limit is None:
                    continue
                run = replica.run
                over = await self._measure(replica, replica.disk_limit)
                if over is not None and replica.alive and replica.run == run and replica.over_disk is None:
                    log.warning("stopping %s: %s", replica.replica_id, over)
                    replica.over_disk = over
                    replica.signals_sent.add("KILL")
                    self._kill_all(replica)

    async def _report_files_left(self) -> None:
        """Report the replica directories an earlier run of the node left (see the module's doc)."""
        found = await trio.to_thread.run_sync(self._files_left, abandon_on_cancel=True)
        for replica_id, disk_bytes, age_s in found:
            if replica_id not in self._replicas:  # not started again meanwhile
                self._report(FilesLeft(replica_id, disk_bytes, age_s))

    def _files_left(self) -> list[tuple[str, int, float]]:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        found = []
        for name in names:
            try:
                directory = self.replica_dir(name)
            except ValueError:
                continue  # not a replica's
            if name in self._replicas or not stat.S_ISDIR(_lstat_mode(directory)):
                continue
            disk_bytes, _ = files_size([directory], self.config.max_counted_entries)
            age_s = max(0.0, time.time() - _last_in_use(directory))
            found.append((name, disk_bytes, age_s))
        return found

    async def _health(self, command: RunHealthCheck) -> None:
        replica = self._replicas.get(command.replica_id)
        if replica is None or not replica.alive or replica.run != command.run:
            self._report(HealthResult(command.replica_id, command.run, False, "not running"))
            return
        check = command.check
        port = check.port or command.port or replica.port
        if check.kind == "none":
            ok, detail = True, "no health check"
        elif check.kind == "command":
            plan = dict(replica.plan, argv=list(check.argv))
            ok, detail = await check_command(
                self._launcher(), sandbox.LAUNCHER_ENVIRONMENT, json.dumps(plan).encode(), check.timeout_s
            )
        elif port is None:
            ok, detail = False, "the replica has no port to check"
        elif check.kind == "tcp":
            ok, detail = await check_tcp(port, check.timeout_s)
        else:
            ok, detail = await check_http(port, check.path, check.timeout_s)
        self._report(HealthResult(command.replica_id, command.run, ok, detail))

    async def _remove(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is None:  # files an earlier run of the node left go too
            await trio.to_thread.run_sync(shutil.rmtree, self.replica_dir(replica_id), True)
            self._report(Removed(replica_id))
            return
        async with replica.lock:
            if replica.alive:
                replica.signals_sent.add("KILL")
                self._kill_all(replica)
                with trio.move_on_after(self.config.remove_wait_s):
                    await replica.exited.wait()
            replica.installed = False
            await trio.to_thread.run_sync(shutil.rmtree, replica.root, True)
        self._replicas.pop(replica_id, None)
        self._report(Removed(replica_id))


def _processes_of(uid: int) -> int:
    count = 0
    for process in psutil.process_iter(["uids"]):
        uids = process.info.get("uids")
        if uids is not None and uids.real == uid:
            count += 1
    return count


def _hand_over(directory: Path, uid: int, gid: int) -> None:
    """Make ``directory`` ``uid``'s, and everything in it when it was another's (a replica that
    ran as another uid before). Links are changed, never followed: the service made them."""
    info = directory.lstat()
    if info.st_uid == uid and (gid == -1 or info.st_gid == gid):
        return
    os.chown(directory, uid, gid, follow_symlinks=False)
    # fwalk holds each directory open: a directory swapped for a link meanwhile is not entered
    for _, names, files, dir_fd in os.fwalk(directory):
        for name in names + files:
            with suppress(OSError):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def _owner(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None


def _known_id(uid: int) -> bool:
    """Whether the system has a user or a group with this number."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


def files_size(roots: Iterable[Path], max_entries: int) -> tuple[int, bool]:
    """Bytes the files under ``roots`` take on disk (allocated blocks, each inode once), and
    whether the walk saw them all: it stops after ``max_entries`` entries. Links are never
    followed; what vanishes or cannot be read while it walks is skipped. A service that swaps a
    directory for a link while it is walked may have the link's target counted: that costs only
    the service's own measure (the walk reads no content and is bounded all the same)."""
    total = 0
    entries = 0
    linked: set[tuple[int, int]] = set()
    pending = [os.fspath(root) for root in roots]
    while pending:
        try:
            listing = os.scandir(pending.pop())
        except OSError:
            continue
        with listing:
            for entry in listing:
                entries += 1
                if entries > max_entries:
                    return total, False
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
                elif info.st_nlink > 1:
                    if (info.st_dev, info.st_ino) in linked:
                        continue
                    linked.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total, True


def _lstat_mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


def _last_in_use(directory: Path) -> float:
    """When a replica's files were last in use: the newest modification time among its directory,
    its ``stopped`` mark and its logs (a node killed outright left no mark)."""
    times = []
    for path in [directory, directory / STOPPED_MARK, *_listing(directory / "logs")]:
        with suppress(OSError):
            times.append(path.lstat().st_mtime)
    return max(times, default=0.0)


def _listing(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


@asynccontextmanager
async def open_executor(config: RealExecutorConfig, sink: ReportSink) -> AsyncIterator[RealExecutor]:
    """Run a :class:`RealExecutor` for the duration of the block; its processes die with it."""
    executor = RealExecutor(config, sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        try:
            yield executor
        finally:
            nursery.cancel_scope.cancel()
