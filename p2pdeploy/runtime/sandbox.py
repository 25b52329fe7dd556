"""Confining a service's processes: cgroups where this node may write them, and the launcher.

Two mechanisms, used together where both work:

- **cgroups** (v2, or v1 per controller, or the hybrid of both): a cgroup per replica run,
  created *inside this node's own cgroup* (so a service never escapes a limit the node itself
  runs under), with ``memory`` (memory.max / memory.limit_in_bytes), ``pids`` (pids.max) and
  ``cpu`` (cpu.max / cpu.cfs_quota_us) limits for the controllers that are available. It also
  names every process of the replica, even one that left its process group, so a stop kills
  them all (``cgroup.kill`` in v2). :func:`detect_cgroups` finds out once what is writable;
  nothing fails when nothing is: the executor then relies on rlimits alone.
- **rlimits**, set by the launcher between fork and exec: RLIMIT_AS (memory, when no cgroup
  limits it), RLIMIT_CPU (when a manifest asks), RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_NPROC
  (processes, when no pids cgroup counts them; it counts per real uid and is not enforced for
  root, which is why a root node runs services as an unprivileged user).

The launcher is this file run as a script (``python -I -S sandbox.py``, the plan as JSON on its
standard input): it joins the cgroups, sets the rlimits, drops to the service's uid/gid, changes
directory and execs the service's command with the service's environment. Doing this in a
separate program rather than in a ``preexec_fn`` keeps the node's (threaded) process from running
Python between fork and exec. The script imports only the standard library.

The launcher runs as the node's user (root, on a root node) until the drop, so nothing of the
service's reaches it before then: its own environment is the node's minimal one (the service's
``[env]`` would let ``LD_PRELOAD`` load a bundled library into a root process), and the service's
environment travels inside the plan and is handed to ``execve`` only after the drop. The plan
comes on a pipe rather than the command line because ``/proc/PID/cmdline`` is readable by every
user, and the plan holds the service's secrets (its state token).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: PATH for the launcher, and for services on a root node unless the owner sets another.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: The launcher's own environment: nothing of the service's (see the module docstring).
LAUNCHER_ENVIRONMENT = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
#: A plan larger than this is refused (a manifest is at most 64 KiB; bindings add little).
MAX_PLAN_BYTES = 1024 * 1024
#: A line the launcher writes to stderr before it gives up; the executor turns it into the reason.
LAUNCHER_MARK = "p2pdeploy-sandbox:"
LAUNCHER_FAILED = 127
RLIMIT_NAMES = ("AS", "CPU", "NOFILE", "FSIZE", "NPROC", "CORE")
CPU_PERIOD_US = 100_000


# -- the launcher (runs in the child, between fork and exec) --------------------------------


def _fail(message: str) -> None:
    os.write(2, f"{LAUNCHER_MARK} {message}\n".encode(errors="replace"))
    os._exit(LAUNCHER_FAILED)


def launch(plan: dict) -> None:
    """Apply ``plan`` to this process and exec the service; never returns."""
    pid = str(os.getpid())
    for procs in plan.get("cgroup_procs", []):
        try:
            with open(procs, "w") as file:
                file.write(pid)
        except OSError as exc:
            _fail(f"cannot join cgroup {procs}: {exc.strerror}")
    for name, (soft, hard) in plan.get("rlimits", {}).items():
        if name not in RLIMIT_NAMES:
            _fail(f"unknown rlimit {name}")
        limit = getattr(resource, f"RLIMIT_{name}")
        try:
            resource.setrlimit(limit, (_rlim(soft), _rlim(hard)))
        except (OSError, ValueError) as exc:
            _fail(f"cannot set RLIMIT_{name} to {soft}/{hard}: {exc}")
    gid = plan.get("gid")
    uid = plan.get("uid")
    try:
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as exc:
        _fail(f"cannot switch to uid {uid} gid {gid}: {exc.strerror}")
    os.umask(plan.get("umask", 0o027))
    try:
        os.chdir(plan["cwd"])
    except OSError as exc:
        _fail(f"cannot enter {plan['cwd']}: {exc.strerror}")
    argv = plan["argv"]
    # Python ignores these, and an ignored signal stays ignored across exec: give them back
    # their default, so that RLIMIT_FSIZE ends a service with SIGXFSZ as it would anywhere else
    for name in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    env = plan.get("env", {})
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        reason = "command not found" if exc.errno == errno.ENOENT else exc.strerror
        _fail(f"cannot run {argv[0]!r}: {reason}")


def _rlim(value: int | None) -> int:
    return resource.RLIM_INFINITY if value is None else int(value)


def read_plan(fd: int = 0) -> dict:
    """The plan, read from ``fd`` to its end; then ``fd`` is ``/dev/null`` (the service gets no input)."""
    chunks = []
    size = 0
    while chunk := os.read(fd, 65536):
        size += len(chunk)
        if size > MAX_PLAN_BYTES:
            _fail(f"the plan is over {MAX_PLAN_BYTES} bytes")
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
    try:
        plan = json.loads(b"".join(chunks))
    except ValueError as exc:
        _fail(f"the plan is not JSON: {exc}")
    if not isinstance(plan, dict):
        _fail("the plan is not a JSON object")
    return plan


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args:
        _fail("usage: sandbox.py < PLAN-JSON (the plan comes on standard input)")
    launch(read_plan())


# -- cgroups (used by the executor, in the node's process) ----------------------------------


@dataclass(frozen=True, slots=True)
class CgroupSupport:
    """Where this node may create cgroups: its own cgroup in each writable hierarchy."""

    #: This process's cgroup directory in the unified (v2) hierarchy, when writable.
    v2_dir: str | None = None
    #: Controllers children of ``v2_dir`` get (``memory``, ``pids``, ``cpu``).
    v2_controllers: frozenset[str] = frozenset()
    #: v1 controller -> this process's cgroup directory in that hierarchy, when writable.
    v1_dirs: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.v2_dir is not None or bool(self.v1_dirs)

    def mechanism(self, controller: str) -> str | None:
        if controller in self.v2_controllers:
            return "cgroup-v2"
        if controller in self.v1_dirs:
            return "cgroup-v1"
        return None

    def describe(self) -> str:
        parts = []
        if self.v2_dir is not None:
            controllers = ", ".join(sorted(self.v2_controllers)) or "no controllers"
            parts.append(f"cgroup v2 at {self.v2_dir} ({controllers})")
        for controller, directory in sorted(self.v1_dirs.items()):
            parts.append(f"cgroup v1 {controller} at {directory}")
        return "; ".join(parts) or "no writable cgroups"


def _own_cgroups(proc_self: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup path in v2 and per v1 controller (from /proc/self/cgroup)."""
    v2_path = None
    v1_paths: dict[str, str] = {}
    for line in (proc_self / "cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        else:
            for controller in controllers.split(","):
                v1_paths[controller] = path
    return v2_path, v1_paths


def _mounts(proc_self: Path) -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
    """(mount point, root) of the cgroup2 mount and of each v1 controller's mount."""
    v2 = None
    v1: dict[str, tuple[str, str]] = {}
    for line in (proc_self / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, mount_point = fields[3], fields[4]
        fstype, options = rest[0], rest[2]
        if fstype == "cgroup2" and v2 is None:
            v2 = (mount_point, root)
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in ("memory", "pids", "cpu"):
                    v1.setdefault(option, (mount_point, root))
    return v2, v1


def _join(mount: tuple[str, str], path: str) -> str | None:
    mount_point, root = mount
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None  # our cgroup is not visible in this mount
    relative = (path[len(root):] if root != "/" else path).strip("/")
    return os.path.join(mount_point, relative) if relative else mount_point


def cgroup_dirs(proc_self: str = "/proc/self") -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
    """This process's cgroup directories, each as ``(directory, mount point)``: v2, and per v1 controller.

    Only reads; ``(None, {})`` when the system has no cgroups this process can see.
    """
    try:
        v2_path, v1_paths = _own_cgroups(Path(proc_self))
        v2_mount, v1_mounts = _mounts(Path(proc_self))
    except (OSError, ValueError, IndexError):
        return None, {}
    v2 = None
    if v2_path is not None and v2_mount is not None:
        directory = _join(v2_mount, v2_path)
        v2 = (directory, v2_mount[0]) if directory is not None else None
    v1: dict[str, tuple[str, str]] = {}
    for controller, mount in v1_mounts.items():
        if controller in v1_paths:
            directory = _join(mount, v1_paths[controller])
            if directory is not None:
                v1[controller] = (directory, mount[0])
    return v2, v1


def _writable(directory: str) -> bool:
    probe = os.path.join(directory, f"p2pdeploy-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return True


def detect_cgroups(*, enable_v2_controllers: bool = True, proc_self: str = "/proc/self") -> CgroupSupport:
    """What cgroups this node may create (never raises: an unusual system gives no support)."""
    try:
        return _detect(Path(proc_self), enable_v2_controllers)
    except (OSError, ValueError, IndexError):
        return CgroupSupport()


def _detect(proc_self: Path, enable_v2_controllers: bool) -> CgroupSupport:
    v2_path, v1_paths = _own_cgroups(proc_self)
    v2_mount, v1_mounts = _mounts(proc_self)
    v2_dir = None
    v2_controllers: frozenset[str] = frozenset()
    if v2_path is not None and v2_mount is not None:
        candidate = _join(v2_mount, v2_path)
        if candidate is not None and os.path.isdir(candidate) and _writable(candidate):
            v2_dir = candidate
            v2_controllers = _v2_child_controllers(candidate, enable_v2_controllers)
    v1_dirs: dict[str, str] = {}
    for controller, mount in v1_mounts.items():
        if controller in v2_controllers or controller not in v1_paths:
            continue
        candidate = _join(mount, v1_paths[controller])
        if candidate is not None and os.path.isdir(candidate) and _writable(candidate):
            v1_dirs[controller] = candidate
    return CgroupSupport(v2_dir, v2_controllers, v1_dirs)


def _v2_child_controllers(directory: str, enable: bool) -> frozenset[str]:
    def read(name: str) -> set[str]:
        try:
            return set(Path(directory, name).read_text().split())
        except OSError:
            return set()

    wanted = {"memory", "pids", "cpu"}
    if enable:
        for controller in sorted((read("cgroup.controllers") & wanted) - read("cgroup.subtree_control")):
            # fails (EBUSY) when our own cgroup holds processes and is not the root: fine
            with contextlib.suppress(OSError):
                Path(directory, "cgroup.subtree_control").write_text(f"+{controller}")
    return frozenset(read("cgroup.subtree_control") & wanted)


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory_bytes: int | None = None
    processes: int | None = None
    cpu_cores: float | None = None


class ReplicaCgroup:
    """The cgroups of one replica run; every method tolerates a cgroup that went away."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.directories: list[str] = []
        #: ``cgroup.procs`` files the launcher joins.
        self.procs_files: list[str] = []
        #: What each limit is enforced by: ``{"memory": "cgroup-v1", ...}``.
        self.enforced: dict[str, str] = {}
        self._memory_dir: tuple[str, str] | None = None  # (directory, "v1" | "v2")
        self._pids_dir: str | None = None
        self._kill_file: str | None = None

    @classmethod
    def create(cls, support: CgroupSupport, name: str, limits: CgroupLimits) -> ReplicaCgroup:
        group = cls(name)
        if support.v2_dir is not None:
            directory = group._make(support.v2_dir)
            if directory is not None:
                kill = os.path.join(directory, "cgroup.kill")
                group._kill_file = kill if os.path.exists(kill) else None
                if "memory" in support.v2_controllers:
                    group._memory_dir = (directory, "v2")
                    if limits.memory_bytes is not None and group._write(directory, "memory.max", limits.memory_bytes):
                        group._write(directory, "memory.swap.max", 0)
                        group.enforced["memory"] = "cgroup-v2"
                if "pids" in support.v2_controllers:
                    group._pids_dir = directory
                    if limits.processes is not None and group._write(directory, "pids.max", limits.processes):
                        group.enforced["processes"] = "cgroup-v2"
                if "cpu" in support.v2_controllers and limits.cpu_cores is not None:
                    quota = max(1000, int(limits.cpu_cores * CPU_PERIOD_US))
                    if group._write(directory, "cpu.max", f"{quota} {CPU_PERIOD_US}"):
                        group.enforced["cpu"] = "cgroup-v2"
        for controller, parent in sorted(support.v1_dirs.items()):
            directory = group._make(parent)
            if directory is None:
                continue
            if controller == "memory":
                group._memory_dir = (directory, "v1")
                if limits.memory_bytes is not None and group._write(directory, "memory.limit_in_bytes", limits.memory_bytes):
                    group._write(directory, "memory.memsw.limit_in_bytes", limits.memory_bytes)  # no swap either
                    group.enforced["memory"] = "cgroup-v1"
            elif controller == "pids":
                group._pids_dir = group._pids_dir or directory
                if limits.processes is not None and group._write(directory, "pids.max", limits.processes):
                    group.enforced["processes"] = "cgroup-v1"
            elif controller == "cpu" and limits.cpu_cores is not None:
                quota = max(1000, int(limits.cpu_cores * CPU_PERIOD_US))
                if group._write(directory, "cpu.cfs_period_us", CPU_PERIOD_US) and group._write(
                    directory, "cpu.cfs_quota_us", quota
                ):
                    group.enforced["cpu"] = "cgroup-v1"
        return group

    def _make(self, parent: str) -> str | None:
        directory = os.path.join(parent, self.name)
        try:
            os.mkdir(directory)
        except FileExistsError:
            pass
        except OSError:
            return None
        self.directories.append(directory)
        self.procs_files.append(os.path.join(directory, "cgroup.procs"))
        return directory

    @staticmethod
    def _write(directory: str, name: str, value: object) -> bool:
        try:
            Path(directory, name).write_text(str(value))
        except OSError:
            return False
        return True

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup (memory limit)."""
        if self._memory_dir is None:
            return 0
        directory, version = self._memory_dir
        name = "memory.events" if version == "v2" else "memory.oom_control"
        try:
            for line in Path(directory, name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(line) for line in Path(procs).read_text().split())
            except (OSError, ValueError):
                continue
        return found

    def peak_processes(self) -> int | None:
        if self._pids_dir is None:
            return None
        try:
            return int(Path(self._pids_dir, "pids.peak").read_text())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL every process in the replica's cgroups (``cgroup.kill`` where there is one)."""
        if self._kill_file is not None:
            with contextlib.suppress(OSError):
                Path(self._kill_file).write_text("1")
        for _ in range(100):  # a process forking while we kill: its children join the cgroup too
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup directories (True when all are gone; they must be empty)."""
        gone = True
        for directory in list(self.directories):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
                continue
            self.directories.remove(directory)
        return gone


def sweep_stale_cgroups(support: CgroupSupport, prefix: str) -> list[str]:
    """Kill the processes of, and remove, replica cgroups left by a node that died without cleaning up.

    Replica cgroups are named ``<prefix>-<node pid>-...``; those whose node process no longer
    exists are swept. Returns the directories removed. Never raises.
    """
    parents = ([support.v2_dir] if support.v2_dir else []) + list(support.v1_dirs.values())
    removed: list[str] = []
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            owner = name[len(prefix) + 1 :].split("-", 1)[0] if name.startswith(prefix + "-") else ""
            if not owner.isdigit() or int(owner) == os.getpid() or _alive(int(owner)):
                continue
            group = ReplicaCgroup(name)
            directory = os.path.join(parent, name)
            group.directories.append(directory)
            group.procs_files.append(os.path.join(directory, "cgroup.procs"))
            kill_file = os.path.join(directory, "cgroup.kill")
            group._kill_file = kill_file if os.path.exists(kill_file) else None
            group.kill()
            for _ in range(50):
                if group.remove():
                    removed.append(directory)
                    break
                time.sleep(0.01)  # killed processes leave their cgroup a moment later
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
