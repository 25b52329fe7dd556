"""The supervisor of one replica: its states, health, restarts and stop sequence, sans-I/O.

A replica moves through the states its users watch::

    requested -> fetching -> installing -> starting -> running
                                              |           |
                                              v           v
                                   failed <-> (restart after backoff)   stopping -> stopped

The moves a replica may make are the table :data:`TRANSITIONS`; every move is emitted as a
:class:`ReplicaStateChanged` event with the reason (``failed: memory limit``). The supervisor
decides, the executor acts: it emits executor commands (``StartProcess``, ``SignalProcess``,
``RunHealthCheck``, ...; see :mod:`p2pdeploy.fabric.executor`) as events, and consumes the
executor's reports through :meth:`Supervisor.report`.

- Health (after Docker's HEALTHCHECK and Kubernetes' liveness probes): checks run every
  ``interval_s`` (``start_interval_s`` while starting), one at a time; a starting replica
  becomes running at its first passing check
  (failures during ``start_period_s`` do not count, but not passing by its end does); a running
  replica that fails ``failures`` checks in a row is unhealthy and is stopped and restarted.
- Restarts (after systemd's ``Restart=`` and ``StartLimitBurst``): ``never``, ``on-failure`` or
  ``always``; the delay grows exponentially from ``backoff_initial_s`` to ``backoff_max_s``
  with the restarts in the last ``window_s``; after ``max_restarts`` of them it gives up.
- Stop: TERM to the process group, KILL when ``stop_grace_s`` passes, and the replica is
  stopped when the executor reports the exit (or ``kill_wait_s`` after KILL, if it never does).

It reads no clock: ``now`` comes with every input, and the timers are the core's.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from p2pdeploy.core import Address, Protocol, Rng, require_at_least, require_positive
from p2pdeploy.fabric.executor import (
    ExecutorReport,
    HealthCheck,
    HealthResult,
    InstallBundle,
    Installed,
    ProcessExited,
    ProcessFailedToStart,
    ProcessSpec,
    ProcessStarted,
    RunHealthCheck,
    SignalProcess,
    StartProcess,
)


class ReplicaState(Enum):
    REQUESTED = "requested"
    FETCHING = "fetching"
    INSTALLING = "installing"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"
    STOPPED = "stopped"


S = ReplicaState
#: The moves a replica may make. ``failed -> failed`` only updates the reason (when it gives up).
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    S.REQUESTED: frozenset({S.FETCHING, S.INSTALLING, S.STOPPED}),
    S.FETCHING: frozenset({S.INSTALLING, S.FAILED, S.STOPPED}),
    S.INSTALLING: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.RUNNING: frozenset({S.FAILED, S.STOPPING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}


LOST_AFTER_KILL = "did not exit after KILL"


class SupervisorError(Exception):
    """Local misuse (a move the table forbids, a second start); never caused by a report."""


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    mode: Literal["never", "on-failure", "always"] = "on-failure"
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_factor: float = 2.0
    #: Restarts allowed within ``window_s``; one more and the replica stays failed.
    max_restarts: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("never", "on-failure", "always"):
            raise ValueError(f"restart.policy must be never, on-failure or always (got {self.mode!r})")
        require_positive(self, "restart.", "backoff_initial_s", "backoff_max_s", "window_s")
        require_at_least(self, "restart.", 1, "backoff_factor")
        require_at_least(self, "restart.", 0, "max_restarts")

    def delay_s(self, recent_restarts: int) -> float:
        """The wait before the next restart, after ``recent_restarts`` in the window."""
        exponent = min(recent_restarts, 64)  # the cap is reached long before; avoid overflow
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_factor**exponent)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """Everything the supervisor needs to run one replica."""

    process: ProcessSpec
    health: HealthCheck = field(default_factory=HealthCheck)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_s: float = 10.0
    #: After KILL, how long to wait for the executor's exit report before declaring it gone.
    kill_wait_s: float = 5.0

    @property
    def replica_id(self) -> str:
        return self.process.replica_id

    @classmethod
    def awaiting_bundle(cls, replica_id: str) -> ReplicaSpec:
        """The spec of a replica whose bundle (and so its manifest) is still being fetched:
        nothing runs it; :meth:`Supervisor.bundle_fetched` replaces it with the manifest's."""
        return cls(ProcessSpec(replica_id, 1, ("(bundle not fetched yet)",)))

    def __post_init__(self) -> None:
        if not self.stop_grace_s >= 0:
            raise ValueError(f"stop.grace_s must be >= 0 (got {self.stop_grace_s})")
        if not self.kill_wait_s > 0:
            raise ValueError(f"stop.kill_wait_s must be > 0 (got {self.kill_wait_s})")


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaStateChanged:
    replica_id: str
    old: ReplicaState
    new: ReplicaState
    reason: str
    run: int

    def __str__(self) -> str:
        return f"{self.replica_id}: {self.new.value}" + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True, slots=True)
class FetchBundle:
    """The supervisor needs the bundle with this digest (the collective layer fetches it)."""

    replica_id: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A replica as its users see it."""

    replica_id: str
    state: ReplicaState
    reason: str
    run: int
    restarts: int
    pid: int | None
    port: int | None
    healthy: bool
    since: float
    #: When the next restart is due, while a failed replica waits for it.
    restart_at: float | None = None

    def __str__(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value


# -- the state machine ----------------------------------------------------------------------


class Supervisor(Protocol):
    """One replica's supervisor. Inputs: ``start``, ``stop``, ``report``, ``handle_timer``."""

    def __init__(self, spec: ReplicaSpec, rng: Rng | None = None, *, digest: bytes = b"") -> None:
        super().__init__()
        self.spec = spec
        self.rng = rng
        self.digest = digest
        self.state = ReplicaState.REQUESTED
        self.reason = ""
        self.since = 0.0
        self.run = 0
        self.restarts = 0
        self.pid: int | None = None
        self.port: int | None = spec.process.port
        self.healthy = False
        self._process_alive = False  # a StartProcess is out and no exit came back yet
        self._started = False
        self._term_pending = False  # stop asked before the process reported its start
        self._killed_after_grace = False
        self._check_in_flight = False
        self._consecutive_failures = 0
        self._last_check_detail = ""
        self._recent_restarts: deque[float] = deque()

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing will: stopped, or failed with no restart coming."""
        if self._process_alive:
            return False
        return self.state is S.STOPPED or (self.state is S.FAILED and self.timer_deadline("restart") is None)

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.replica_id, self.state, self.reason, self.run, self.restarts, self.pid, self.port,
            self.healthy, self.since, self.timer_deadline("restart"),
        )  # fmt: skip

    # -- API -------------------------------------------------------------------------------
    def start(self, now: float, bundle: bytes | None = None) -> None:
        """Begin: install ``bundle``, or ask for it (``FetchBundle``) when it is not at hand."""
        if self._started:
            raise SupervisorError(f"replica {self.replica_id} was already started")
        self._started = True
        self.since = now
        if bundle is None:
            self._move(S.FETCHING, "waiting for the bundle", now)
            self.emit(FetchBundle(self.replica_id, self.digest))
        else:
            self._install(bundle, now)

    def bundle_fetched(self, bundle: bytes, now: float, spec: ReplicaSpec | None = None) -> None:
        """The bundle arrived: install it. ``spec``: the replica's spec, read from the bundle's
        manifest, for a replica started before its bundle was at hand."""
        if self.state is S.FETCHING:
            if spec is not None:
                if spec.replica_id != self.replica_id:
                    raise SupervisorError(f"replica {self.replica_id} was given the spec of {spec.replica_id}")
                self.spec = spec
                self.port = spec.process.port
            self._install(bundle, now)

    def fetch_failed(self, reason: str, now: float) -> None:
        """The bundle could not be had (or was refused): the replica fails with ``reason``."""
        if self.state is S.FETCHING:
            self._move(S.FAILED, reason, now)

    def stop(self, now: float, reason: str = "stop requested") -> None:
        """Stop the replica: TERM, then KILL after the grace period; idempotent."""
        if self.state in (S.STOPPED, S.STOPPING):
            return
        if not self._process_alive:
            self.cancel_timer("restart")
            self._move(S.STOPPED, reason, now)
            return
        already_terminating = self.timer_deadline("kill") is not None or self.timer_deadline("kill_wait") is not None
        self._move(S.STOPPING, reason, now)
        self._stop_checks()
        if already_terminating:
            return
        if self.pid is None:
            self._term_pending = True
        else:
            self._terminate(now)

    def report(self, report: ExecutorReport, now: float) -> None:
        """An executor report about this replica (late reports of earlier runs are ignored)."""
        if isinstance(report, Installed):
            self._on_installed(report, now)
            return
        if getattr(report, "run", None) != self.run or not self._process_alive:
            self.dropped["stale_report"] += 1
            return
        if isinstance(report, ProcessStarted):
            self._on_started(report, now)
        elif isinstance(report, HealthResult):
            self._on_health(report, now)
        elif isinstance(report, ProcessExited):
            self._on_gone(now, reason=report.reason, clean=report.clean)
        elif isinstance(report, ProcessFailedToStart):
            self._on_gone(now, reason=report.reason, clean=False)
        else:
            self.dropped["unexpected_report"] += 1

    def receive(self, src: Address, msg: Any, now: float) -> None:
        self.dropped["unexpected"] += 1  # a supervisor hears only its executor

    # -- installing and starting -----------------------------------------------------------
    def _install(self, bundle: bytes, now: float) -> None:
        self._move(S.INSTALLING, "", now)
        self.emit(InstallBundle(self.replica_id, bundle))

    def _on_installed(self, report: Installed, now: float) -> None:
        if self.state is not S.INSTALLING:
            self.dropped["stale_report"] += 1
            return
        if report.ok:
            self._launch(now)
        else:
            self._move(S.FAILED, f"install: {report.reason}", now)

    def _launch(self, now: float) -> None:
        self.run += 1
        self.pid = None
        self.healthy = False
        self._process_alive = True
        self._killed_after_grace = False
        self._consecutive_failures = 0
        self._last_check_detail = ""
        self._move(S.STARTING, "" if self.run == 1 else f"restart {self.run - 1}", now)
        # the port as asked (usually None): the executor keeps a replica's port across runs when it can
        self.emit(StartProcess(dataclasses.replace(self.spec.process, run=self.run)))

    def _on_started(self, report: ProcessStarted, now: float) -> None:
        self.pid = report.pid
        if report.port is not None:
            self.port = report.port
        if self._term_pending:
            self._term_pending = False
            self._terminate(now)
            return
        if self.state is not S.STARTING:
            return
        health = self.spec.health
        if health.kind == "none":
            self.healthy = True
            self._move(S.RUNNING, "process started", now)
            return
        self.set_timer("health", now + min(health.interval_s, health.start_interval_s))
        self.set_timer("start_deadline", now + health.start_period_s)

    # -- health ----------------------------------------------------------------------------
    def _run_check(self, now: float) -> None:
        if self._check_in_flight or self.state not in (S.STARTING, S.RUNNING) or self.pid is None:
            return
        self._check_in_flight = True
        health = self.spec.health
        self.emit(RunHealthCheck(self.replica_id, self.run, health, self.port))
        # an executor always answers, but a lost answer must not stop the checks for good
        self.set_timer("health_overdue", now + 2 * health.timeout_s + 1.0)

    def _on_health(self, report: HealthResult, now: float) -> None:
        if not self._check_in_flight:
            self.dropped["unsolicited_health"] += 1
            return
        self._check_in_flight = False
        self.cancel_timer("health_overdue")
        self._health_outcome(report.ok, report.detail, now)

    def _health_outcome(self, ok: bool, detail: str, now: float) -> None:
        health = self.spec.health
        self._last_check_detail = detail
        if ok:
            self._consecutive_failures = 0
            self.healthy = True
            if self.state is S.STARTING:
                self.cancel_timer("start_deadline")
                self._move(S.RUNNING, "healthy", now)
        else:
            self._consecutive_failures += 1
            if self.state is S.RUNNING:
                self.healthy = False
                if self._consecutive_failures >= health.failures:
                    why = f"unhealthy: {self._consecutive_failures} health checks failed in a row"
                    self._unhealthy(f"{why} ({detail})" if detail else why, now)
                    return
        if self.state is S.STARTING:
            self.set_timer("health", now + min(health.interval_s, health.start_interval_s))
        elif self.state is S.RUNNING:
            self.set_timer("health", now + health.interval_s)

    def _unhealthy(self, reason: str, now: float) -> None:
        """Fail the replica and end its process; the restart policy decides once it is gone."""
        self._stop_checks()
        self.healthy = False
        self._move(S.FAILED, reason, now)
        self._terminate(now)

    def _stop_checks(self) -> None:
        for name in ("health", "health_overdue", "start_deadline"):
            self.cancel_timer(name)
        self._check_in_flight = False

    # -- ending ----------------------------------------------------------------------------
    def _terminate(self, now: float) -> None:
        self.emit(SignalProcess(self.replica_id, self.run, "TERM"))
        self.set_timer("kill", now + self.spec.stop_grace_s)

    def _on_gone(self, now: float, *, reason: str, clean: bool) -> None:
        """The process of the current run is gone (exited, killed, or never started)."""
        self._process_alive = False
        self.pid = None
        self.healthy = False
        self._term_pending = False
        self._stop_checks()
        self.cancel_timer("kill")
        self.cancel_timer("kill_wait")
        if self.state is S.STOPPING:
            if self._killed_after_grace and reason != LOST_AFTER_KILL:
                reason = f"killed after the {self.spec.stop_grace_s:g} s grace period"
            self._move(S.STOPPED, reason, now)
        elif self.state is S.FAILED:  # we ended it for being unhealthy
            self._restart_or_stay_failed(self.reason, now, updating=True)
        elif clean and self.spec.restart.mode != "always":
            self._move(S.STOPPED, reason, now)  # a job that finished
        else:
            self._restart_or_stay_failed(reason, now)

    def _restart_or_stay_failed(self, reason: str, now: float, *, updating: bool = False) -> None:
        policy = self.spec.restart
        window_start = now - policy.window_s
        while self._recent_restarts and self._recent_restarts[0] <= window_start:
            self._recent_restarts.popleft()
        if policy.mode == "never":
            if not updating:
                self._move(S.FAILED, reason, now)
            return
        if len(self._recent_restarts) >= policy.max_restarts:
            self._move(
                S.FAILED,
                f"{reason}; gave up after {len(self._recent_restarts)} restarts in {policy.window_s:g} s",
                now,
            )
            return
        delay = policy.delay_s(len(self._recent_restarts))
        if self.rng is not None:
            delay *= 0.9 + 0.2 * self.rng.random()  # replicas that failed together do not restart in step
        if not updating:
            self._move(S.FAILED, reason, now)
        self.set_timer("restart", now + delay)

    # -- timers ----------------------------------------------------------------------------
    def on_timer(self, name: Hashable, now: float) -> None:
        if name == "health":
            self._run_check(now)
        elif name == "health_overdue":
            if self._check_in_flight:
                self._check_in_flight = False
                self._health_outcome(False, "the health check did not answer", now)
        elif name == "start_deadline":
            if self.state is S.STARTING:
                detail = f" ({self._last_check_detail})" if self._last_check_detail else ""
                self._unhealthy(
                    f"unhealthy: not healthy {self.spec.health.start_period_s:g} s after starting{detail}", now
                )
        elif name == "restart":
            if self.state is S.FAILED and not self._process_alive:
                self._recent_restarts.append(now)
                self.restarts += 1
                self._launch(now)
        elif name == "kill":
            if self._process_alive:
                self._killed_after_grace = True
                self.emit(SignalProcess(self.replica_id, self.run, "KILL"))
                self.set_timer("kill_wait", now + self.spec.kill_wait_s)
        elif name == "kill_wait" and self._process_alive:
            self.dropped["lost_process"] += 1
            self._on_gone(now, reason=LOST_AFTER_KILL, clean=False)

    # -- moves -----------------------------------------------------------------------------
    def _move(self, new: ReplicaState, reason: str, now: float) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise SupervisorError(f"replica {self.replica_id}: no move from {old.value} to {new.value}")
        self.state = new
        self.reason = reason
        self.since = now
        self.emit(ReplicaStateChanged(self.replica_id, old, new, reason, self.run))
