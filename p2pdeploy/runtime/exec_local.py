"""A trio driver for a node's replica layers alone: a core, a real executor, real time.

It is the same driver loop as the node's (after every input: drain events, then messages, then
re-arm the one timer), for a core that holds a :class:`~p2pdeploy.fabric.replicas.ReplicaHost`
(and, when asked, the :class:`~p2pdeploy.resource.protocol.RemoteControl` that wraps it), with
the executor wired in: executor commands among the core's events go to the executor, its
reports come back as core input, and ``LogsRequested`` is answered from the executor's logs.
Messages the core sends go to a ``send(dst, msg)`` callable (tests link a client in memory).

The node's own driver (``runtime/node.py``) does the same wiring when its stack holds these
layers; this one serves local runs and the tests of the fabric and resource layers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from p2pdeploy.core import Protocol, Stack
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import COMMANDS, ExecutorReport
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaState, ReplicaStateChanged
from p2pdeploy.resource.protocol import LogsRequested, RemoteControl
from p2pdeploy.runtime.executor import RealExecutor, RealExecutorConfig

Send = Callable[[Any, Any], None]


class ReplicaWiring:
    """The wiring between a core's replica layers and an executor, for any trio driver.

    A driver calls :meth:`dispatch` on every core event (before its own handling); executor
    commands go to the executor and ``LogsRequested`` is answered from its logs. The
    executor's sink calls :meth:`report`, then the driver drains the core as after any input.
    """

    def __init__(self, core: Stack, executor: RealExecutor) -> None:
        self.host: ReplicaHost = core.layer(ReplicaHost)
        self.remote: RemoteControl | None = next((la for la in core.layers if isinstance(la, RemoteControl)), None)
        self.executor = executor

    def dispatch(self, event: Any, now: float) -> bool:
        """Act on ``event`` if it is for the executor; True when it was."""
        if isinstance(event, COMMANDS):
            self.executor.execute(event)
            return True
        if isinstance(event, LogsRequested) and self.remote is not None:
            data = self.executor.read_logs(event.replica_id, event.max_bytes)
            self.remote.answer_logs(event.token, data, now)
            return True
        return False

    def report(self, report: ExecutorReport, now: float) -> None:
        self.host.report(report, now)


class LocalReplicas:
    """A running core with its real executor; build it with :func:`open_local_replicas`."""

    def __init__(self, core: Stack, executor: RealExecutor, send: Send | None = None) -> None:
        self.core = core
        self.wiring = ReplicaWiring(core, executor)
        self.host = self.wiring.host
        self.remote = self.wiring.remote
        self.executor = executor
        self.send = send or (lambda dst, msg: None)
        #: Every event the core emitted, in order.
        self.events: list[Any] = []
        self._changed = trio.Event()
        self._timer_scope: trio.CancelScope | None = None

    # -- inputs ----------------------------------------------------------------------------
    def command(self, call: Callable[[Any, float], Any]) -> Any:
        """Run ``call(core, now)`` (an API call that only queues work), then drain the output."""
        result = call(self.core, trio.current_time())
        self._after_input()
        return result

    def receive(self, src: Any, msg: Any) -> None:
        self.core.receive(src, msg, trio.current_time())
        self._after_input()

    def report(self, report: ExecutorReport) -> None:
        """The executor's sink."""
        self.wiring.report(report, trio.current_time())
        self._after_input()

    # -- waiting ---------------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[Any], bool], timeout_s: float = 30.0) -> Any:
        """The first event (already emitted or to come) that ``predicate`` accepts."""
        seen = 0
        with trio.fail_after(timeout_s):
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                changed = self._changed
                await changed.wait()

    async def wait_for_state(self, replica_id: str, state: ReplicaState, timeout_s: float = 30.0) -> ReplicaStateChanged:
        return await self.wait_for(
            lambda e: isinstance(e, ReplicaStateChanged) and e.replica_id == replica_id and e.new is state, timeout_s
        )

    def states(self, replica_id: str) -> list[str]:
        """The states the replica went through, as ``state`` or ``state: reason``."""
        return [
            f"{e.new.value}: {e.reason}" if e.reason else e.new.value
            for e in self.events
            if isinstance(e, ReplicaStateChanged) and e.replica_id == replica_id
        ]

    # -- the driver step -------------------------------------------------------------------
    def _after_input(self) -> None:
        core = self.core
        while True:
            event = core.next_event(trio.current_time())
            if event is None:
                break
            self.events.append(event)
            self.wiring.dispatch(event, trio.current_time())
        for dst, msg in core.messages_to_send():
            self.send(dst, msg)
        if self._timer_scope is not None:
            deadline = core.next_deadline()
            self._timer_scope.deadline = float("inf") if deadline is None else deadline
        self._changed.set()
        self._changed = trio.Event()

    async def run_timer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            deadline = self.core.next_deadline()
            with trio.CancelScope(deadline=float("inf") if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            deadline = self.core.next_deadline()
            now = trio.current_time()
            if deadline is not None and deadline <= now:
                self.core.handle_timer(max(deadline, now))
                self._after_input()


@asynccontextmanager
async def open_local_replicas(
    data_dir: str | Path,
    contribution: Contribution,
    *,
    executor_config: RealExecutorConfig | None = None,
    layers: Callable[[ReplicaHost], list[Protocol]] | None = None,
    send: Send | None = None,
) -> AsyncIterator[LocalReplicas]:
    """A :class:`ReplicaHost` (plus ``layers(host)``) on a real executor, for the block's duration.

    Every replica's processes are killed when the block ends.
    """
    host = ReplicaHost(contribution)
    extra = layers(host) if layers is not None else []
    for layer in extra:
        if isinstance(layer, RemoteControl):
            # signed timestamps are wall time; the core runs on trio's clock
            layer.set_wall_clock_offset(time.time() - trio.current_time())
    core = Stack([host, *extra])
    config = executor_config or RealExecutorConfig(Path(data_dir))
    local: LocalReplicas | None = None

    def sink(report: ExecutorReport) -> None:
        if local is not None:
            local.report(report)

    executor = RealExecutor(config, sink)
    local = LocalReplicas(core, executor, send)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        await nursery.start(local.run_timer)
        try:
            yield local
        finally:
            nursery.cancel_scope.cancel()
