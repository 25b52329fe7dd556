"""The simulated executor: replicas as modelled processes on the simulator's virtual clock.

It implements the contract of :mod:`p2pdeploy.fabric.executor` with the same commands and
reports as the real executor, so supervisors and the remote protocol run unchanged in a
simulation. Nothing runs: a process is a record with a pid, a port and scheduled events.

- Installing takes ``install_delay_s``; a bundle that breaks the safety rules is refused as the
  real executor refuses it (the same checks, from ``p2pdeploy.resource.bundle``).
- A started process is reported at once and becomes ready (passes health checks) after a start
  delay: the manifest's ``[simulation] start_delay_s``, else ``start_delay_s`` +/- jitter.
- It crashes at a rate (``crash_rate_per_s`` of the executor plus the service's own, drawn
  from the seeded stream), exits when its ``exit_after_s`` passes, and dies of ``memory limit``
  when its modelled ``memory_peak_bytes`` exceeds its memory limit.
- TERM ends it after ``term_exit_delay_s`` unless it ``ignores_term``; KILL always ends it.
- Logs are modelled by size: lines for its events plus ``log_bytes_per_s`` of output, kept to
  ``max_bytes * files`` as the real rotation does.
- Files are not modelled: ``usage()`` reports no disk, so no replica outgrows its ``disk``
  reservation here (the real executor measures and stops it), and the executor reports no
  ``FilesLeft`` from an earlier run; a finished replica's reserved disk is held and released
  after the retention period by the core, the same as on a real node.

Draws come from the ``rng`` handed in, and events run on the engine's heap, so a seed gives the
same run every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pdeploy.core import require_at_least
from p2pdeploy.fabric.executor import (
    COMMANDS,
    REASON_KILLED,
    REASON_MEMORY,
    REASON_TERM,
    ExecutorCommand,
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
    SimulatedBehaviour,
    StartProcess,
    Usage,
    exit_reason,
)
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.resource.bundle import BundleError, check_members, list_members
from p2pdeploy.resource.protocol import LogsRequested, RemoteControl

if TYPE_CHECKING:
    from p2pdeploy.core import Rng
    from p2pdeploy.sim.engine import Engine
    from p2pdeploy.sim.host import SimNode

REASON_CRASH = "crashed (simulated)"
#: What a chatty simulated process prints, a line at a time.
_OUTPUT_LINE = b"x" * 1023 + b"\n"


@dataclass(frozen=True, slots=True)
class SimExecutorConfig:
    install_delay_s: float = 0.2
    start_delay_s: float = 0.5
    #: The start delay is drawn uniformly within +/- this much.
    start_jitter_s: float = 0.2
    #: Crashes per second of uptime of every process (exponential inter-crash times).
    crash_rate_per_s: float = 0.0
    check_delay_s: float = 0.01
    term_exit_delay_s: float = 0.05
    first_port: int = 20000
    #: Check bundles as the real executor does; a large simulation may hand placeholder bytes
    #: instead of tarballs and turn this off.
    check_bundles: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, "sim executor ", 0, "install_delay_s", "start_delay_s", "start_jitter_s",
                         "crash_rate_per_s", "check_delay_s", "term_exit_delay_s")


@dataclass(eq=False)
class _SimReplica:
    replica_id: str
    installed: bool = False
    run: int = 0
    alive: bool = False
    ready: bool = False
    pid: int | None = None
    port: int | None = None
    spec: ProcessSpec | None = None
    behaviour: SimulatedBehaviour = field(default_factory=SimulatedBehaviour)
    started_at: float = 0.0
    ended_at: float | None = None
    signals_sent: set[str] = field(default_factory=set)
    pending_exit: tuple[float, int | None, str | None, str] | None = None
    log_policy: LogPolicy = field(default_factory=LogPolicy)
    log_text: bytearray = field(default_factory=bytearray)
    log_total: int = 0  # bytes ever written (modelled), before rotation
    produced: int = 0  # modelled output of the current run already added to the log


class SimExecutor:
    """The simulated executor on ``engine``; reports go to ``sink`` at virtual times."""

    def __init__(self, engine: Engine, rng: Rng, sink: ReportSink, config: SimExecutorConfig | None = None) -> None:
        self.engine = engine
        self.rng = rng
        self.sink = sink
        self.config = config or SimExecutorConfig()
        self._replicas: dict[str, _SimReplica] = {}
        self._next_pid = 1000
        self._next_port = self.config.first_port

    # -- the contract ----------------------------------------------------------------------
    def execute(self, command: ExecutorCommand) -> None:
        now = self.engine.now
        if isinstance(command, InstallBundle):
            self._install(command, now)
        elif isinstance(command, StartProcess):
            self._start(command.spec, now)
        elif isinstance(command, SignalProcess):
            self._signal(command, now)
        elif isinstance(command, RunHealthCheck):
            self.engine.schedule(now + self.config.check_delay_s, self._health, command)
        elif isinstance(command, RemoveReplica):
            self._remove(command.replica_id, now)

    def read_logs(self, replica_id: str, max_bytes: int) -> bytes:
        replica = self._replicas.get(replica_id)
        if replica is None or max_bytes <= 0:
            return b""
        self._generate_output(replica, self.engine.now)
        return bytes(replica.log_text[-max_bytes:])

    def usage(self, replica_id: str) -> Usage | None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return None
        limit = replica.spec.limits.memory_bytes if replica.spec is not None else None
        memory = replica.behaviour.memory_peak_bytes
        if limit is not None:
            memory = min(memory, limit)
        return Usage(
            running=replica.alive,
            pid=replica.pid if replica.alive else None,
            processes=1 if replica.alive else 0,
            memory_bytes=memory if replica.alive else 0,
            enforced=("simulated",),
        )

    def replicas(self) -> tuple[str, ...]:
        return tuple(r.replica_id for r in self._replicas.values() if r.installed)

    def machine_crashed(self) -> None:
        """The machine went down: every process ends with it, unreported (nobody is listening).

        Installed files survive, as a data directory does, so a rejoining node can start them again.
        """
        for replica in self._replicas.values():
            replica.alive = False
            replica.ready = False
            replica.pending_exit = None

    def logs_total_bytes(self, replica_id: str) -> int:
        """What the replica's logs take (modelled), after rotation."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return 0
        self._generate_output(replica, self.engine.now)
        return len(replica.log_text)

    # -- install ---------------------------------------------------------------------------
    def _install(self, command: InstallBundle, now: float) -> None:
        replica = self._replicas.setdefault(command.replica_id, _SimReplica(command.replica_id))
        if replica.alive:
            report = Installed(command.replica_id, False, f"replica {command.replica_id} is running; stop it first")
        elif not self.config.check_bundles:
            report = Installed(command.replica_id, True)
        else:
            try:
                problem = check_members(list_members(command.bundle))
            except BundleError as exc:
                problem = str(exc).removeprefix("bundle: ")
            report = Installed(command.replica_id, problem is None, f"bundle: {problem}" if problem else "")
        self.engine.schedule(now + self.config.install_delay_s, self._installed, report)

    def _installed(self, report: Installed) -> None:
        replica = self._replicas.get(report.replica_id)
        if replica is not None and report.ok:
            replica.installed = True
        self.sink(report)

    # -- start -----------------------------------------------------------------------------
    def _start(self, spec: ProcessSpec, now: float) -> None:
        replica = self._replicas.get(spec.replica_id)
        if replica is None or not replica.installed:
            self.engine.schedule(now, self.sink, ProcessFailedToStart(spec.replica_id, spec.run, "not installed"))
            return
        if replica.alive:
            reason = f"already running (run {replica.run})"
            self.engine.schedule(now, self.sink, ProcessFailedToStart(spec.replica_id, spec.run, reason))
            return
        self._next_pid += 1
        if spec.port is not None:
            port = spec.port
        elif replica.port is not None:
            port = replica.port
        else:
            port = self._next_port
            self._next_port += 1
        behaviour = spec.simulated or SimulatedBehaviour()
        replica.run = spec.run
        replica.alive = True
        replica.ready = False
        replica.pid = self._next_pid
        replica.port = port
        replica.spec = spec
        replica.behaviour = behaviour
        replica.started_at = now
        replica.ended_at = None
        replica.signals_sent = set()
        replica.pending_exit = None
        replica.log_policy = spec.logs
        replica.produced = 0
        self._log(replica, f"sim: run {spec.run} started, pid {replica.pid}, port {port}\n".encode())
        # reported first, so that an exit due at the same instant comes after it
        self.engine.schedule(now, self.sink, ProcessStarted(spec.replica_id, spec.run, replica.pid, port))
        c = self.config
        if behaviour.start_delay_s is not None:
            delay = behaviour.start_delay_s
        else:
            delay = max(0.0, c.start_delay_s + self.rng.uniform(-c.start_jitter_s, c.start_jitter_s))
        self.engine.schedule(now + delay, self._ready, replica.replica_id, spec.run)
        limit = spec.limits.memory_bytes
        if limit is not None and behaviour.memory_peak_bytes > limit:
            self._exit_at(replica, now + delay, None, "KILL", REASON_MEMORY)
        if behaviour.exit_after_s is not None:
            code = behaviour.exit_code
            self._exit_at(replica, now + behaviour.exit_after_s, code, None, exit_reason(code, None))
        rate = c.crash_rate_per_s + behaviour.crash_rate_per_s
        if rate > 0:
            self._exit_at(replica, now + self.rng.expovariate(rate), None, "SEGV", REASON_CRASH)

    def _ready(self, replica_id: str, run: int) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.alive and replica.run == run:
            replica.ready = True
            self._log(replica, f"sim: run {run} ready\n".encode())

    def _exit_at(self, replica: _SimReplica, at: float, code: int | None, signal: str | None, reason: str) -> None:
        """Schedule an exit, keeping only the earliest one of a run."""
        if replica.pending_exit is not None and replica.pending_exit[0] <= at:
            return
        replica.pending_exit = (at, code, signal, reason)
        self.engine.schedule(at, self._exit, replica.replica_id, replica.run, at)

    def _exit(self, replica_id: str, run: int, at: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is None or not replica.alive or replica.run != run or replica.pending_exit is None:
            return
        if replica.pending_exit[0] != at:
            return  # superseded by an earlier exit
        _, code, signal, reason = replica.pending_exit
        self._generate_output(replica, at)
        replica.alive = False
        replica.ready = False
        replica.ended_at = at
        replica.pending_exit = None
        self._log(replica, f"sim: run {run} ended: {reason}\n".encode())
        self.sink(ProcessExited(replica_id, run, code, signal, reason))

    # -- signals, health, removal ----------------------------------------------------------
    def _signal(self, command: SignalProcess, now: float) -> None:
        replica = self._replicas.get(command.replica_id)
        if replica is None or not replica.alive or replica.run != command.run:
            return
        replica.signals_sent.add(command.signal)
        if command.signal == "KILL":
            self._exit_at(replica, now, None, "KILL", REASON_KILLED)
        elif not replica.behaviour.ignores_term:
            self._exit_at(replica, now + self.config.term_exit_delay_s, None, "TERM", REASON_TERM)

    def _health(self, command: RunHealthCheck) -> None:
        replica = self._replicas.get(command.replica_id)
        if replica is None or not replica.alive or replica.run != command.run:
            result = HealthResult(command.replica_id, command.run, False, "not running")
        elif command.check.kind == "none":
            result = HealthResult(command.replica_id, command.run, True, "no health check")
        elif not replica.ready:
            port = command.check.port or command.port or replica.port
            result = HealthResult(command.replica_id, command.run, False, f"connection to port {port} refused")
        elif not replica.behaviour.healthy:
            result = HealthResult(command.replica_id, command.run, False, "unhealthy (simulated)")
        else:
            result = HealthResult(command.replica_id, command.run, True, "healthy (simulated)")
        self.sink(result)

    def _remove(self, replica_id: str, now: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.alive:
            replica.signals_sent.add("KILL")
            self._exit_at(replica, now, None, "KILL", REASON_KILLED)
        self.engine.schedule(now, self._removed, replica_id)

    def _removed(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self.sink(Removed(replica_id))

    # -- modelled logs ---------------------------------------------------------------------
    def _generate_output(self, replica: _SimReplica, now: float) -> None:
        """Add the output a chatty process wrote since it was last looked at."""
        rate = replica.behaviour.log_bytes_per_s
        if rate <= 0 or replica.spec is None:
            return
        end = replica.ended_at if replica.ended_at is not None else now
        line = len(_OUTPUT_LINE)
        produced = int(rate * max(0.0, end - replica.started_at)) // line * line  # whole lines
        if produced > replica.produced:
            chunk = produced - replica.produced
            replica.produced = produced
            cap = replica.log_policy.max_bytes * replica.log_policy.files
            if chunk > cap:  # only the newest files survive rotation anyway
                skipped = (chunk - cap) // line * line
                replica.log_total += skipped
                chunk -= skipped
            self._log(replica, _OUTPUT_LINE * (chunk // line))

    def _log(self, replica: _SimReplica, data: bytes) -> None:
        replica.log_total += len(data)
        replica.log_text += data
        cap = replica.log_policy.max_bytes * replica.log_policy.files
        if len(replica.log_text) > cap:
            # rotation drops whole files: keep what the newest files would hold
            excess = len(replica.log_text) - cap
            dropped_files = -(-excess // replica.log_policy.max_bytes)
            del replica.log_text[: dropped_files * replica.log_policy.max_bytes]


def serve_node(node: SimNode, rng: Rng, config: SimExecutorConfig | None = None) -> SimExecutor:
    """A simulated executor for ``node``, wired the way a driver wires one.

    Executor commands among the node's core events go to the executor (the node's previous
    observer still sees every event); reports go back to the core's ``ReplicaHost`` layer, and
    ``LogsRequested`` of a ``RemoteControl`` layer is answered from the modelled logs. While the
    node is down its reports are dropped; :meth:`SimExecutor.machine_crashed` ends its processes.
    """
    def layer(core: Any, cls: type) -> Any:
        if isinstance(core, cls):
            return core
        return core.layer(cls)

    def sink(report: Any) -> None:
        if node.up:
            node.call(lambda core, now: layer(core, ReplicaHost).report(report, now))

    executor = SimExecutor(node.engine, rng, sink, config)
    previous = node.observer

    def answer_logs(token: int, replica_id: str, max_bytes: int) -> None:
        if node.up:
            data = executor.read_logs(replica_id, max_bytes)
            node.call(lambda core, now: layer(core, RemoteControl).answer_logs(token, data, now))

    def observer(address: int, event: Any) -> None:
        if isinstance(event, COMMANDS):
            executor.execute(event)
        elif isinstance(event, LogsRequested):
            node.engine.schedule(node.engine.now, answer_logs, event.token, event.replica_id, event.max_bytes)
        previous(address, event)

    node.observer = observer
    return executor
