"""One driver interface over both executors, so the contract tests are written once.

``RealHarness`` runs the trio executor on real time; ``SimHarness`` runs the simulated one on
the simulator's engine, advancing virtual time in small steps while it waits. Both build specs
for ``examples/behave/behave.py`` with a matching :class:`SimulatedBehaviour`, so the two
executors are asked to run the same service.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import trio

from p2pdeploy.fabric.executor import (
    ExecutorCommand,
    ExecutorReport,
    Limits,
    LogPolicy,
    ProcessSpec,
    SimulatedBehaviour,
)
from p2pdeploy.sim.engine import Engine
from p2pdeploy.sim.executor import SimExecutor, SimExecutorConfig

GIB = 1024**3


def behaviour_of(mode: str, *args: str) -> SimulatedBehaviour:
    """What ``behave.py MODE ARGS`` does, as the simulator models it."""
    if mode == "exit":
        return SimulatedBehaviour(start_delay_s=0.1, exit_code=int(args[0]), exit_after_s=float(args[1]) if len(args) > 1 else 0.0)
    if mode == "ignore-term":
        return SimulatedBehaviour(start_delay_s=0.1, ignores_term=True)
    if mode == "hog":
        return SimulatedBehaviour(start_delay_s=0.1, memory_peak_bytes=2 * GIB)
    if mode == "chatter":
        return SimulatedBehaviour(start_delay_s=0.1, log_bytes_per_s=float(args[0]))
    return SimulatedBehaviour(start_delay_s=0.1)


class Harness:
    kind = ""
    executor: Any

    def __init__(self) -> None:
        self.reports: list[ExecutorReport] = []

    def sink(self, report: ExecutorReport) -> None:
        self.reports.append(report)

    def execute(self, command: ExecutorCommand) -> None:
        self.executor.execute(command)

    def spec(
        self,
        mode: str,
        *args: str,
        replica_id: str = "r1",
        run: int = 1,
        limits: Limits | None = None,
        logs: LogPolicy | None = None,
    ) -> ProcessSpec:
        return ProcessSpec(
            replica_id=replica_id,
            run=run,
            argv=("python3", "behave.py", mode, *args),
            limits=limits or Limits(memory_bytes=256 * 1024 * 1024, processes=64),
            logs=logs or LogPolicy(),
            simulated=behaviour_of(mode, *args),
        )

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
        raise NotImplementedError

    async def wait_for(self, predicate: Callable[[Any], bool], timeout_s: float = 15.0, *, since: int = 0) -> Any:
        """The first report (from index ``since``) ``predicate`` accepts; fails the test after ``timeout_s``."""
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [r for r in self.reports[since:] if predicate(r)]
            return bool(found)

        assert await self.wait_until(seen, timeout_s), f"no matching report within {timeout_s} s; got {self.reports}"
        return found[0]

    async def stays_false(self, condition: Callable[[], bool], duration_s: float) -> bool:
        """True when ``condition`` is still false after ``duration_s`` (of this harness's time)."""
        return not await self.wait_until(condition, duration_s)

    def alive_pids(self, replica_id: str) -> set[int]:
        raise NotImplementedError


class RealHarness(Harness):
    kind = "real"

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
        with trio.move_on_after(timeout_s):
            while not condition():
                await trio.sleep(0.02)
            return True
        return False

    def alive_pids(self, replica_id: str) -> set[int]:
        return self.executor.pids(replica_id)


class SimHarness(Harness):
    kind = "sim"

    def __init__(self, seed: int = 7, config: SimExecutorConfig | None = None) -> None:
        super().__init__()
        self.engine = Engine()
        self.executor = SimExecutor(self.engine, random.Random(seed), self.sink, config)

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
        deadline = self.engine.now + timeout_s
        while not condition():
            if self.engine.now >= deadline:
                return False
            self.engine.run(until=min(deadline, self.engine.now + 0.01))
        return True

    def alive_pids(self, replica_id: str) -> set[int]:
        usage = self.executor.usage(replica_id)
        return {usage.pid} if usage is not None and usage.running and usage.pid is not None else set()
