"""``p2pdeploy join`` processes on this machine: start them, read what they print, stop them.

Used by ``make demo`` and by the real-process tests. Every process is started with the
current interpreter (``sys.executable -m p2pdeploy.cli join``) and an explicit data directory,
listens on an OS-chosen loopback port, and is killed when the :func:`open_local_processes`
block ends, however it ends. Waits poll the processes' output for a line, bounded by a
timeout; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2pdeploy.runtime.address import HostPort, format_host_port, parse_host_port

NODE_ID_LINE = re.compile(r"^node id ([0-9a-f]{40})\b")
LISTENING_LINE = re.compile(r"^listening on (\S+)")
PEER_LINE = re.compile(r"^peer ([0-9a-f]{40}) at (\S+)")
#: Generous bounds for a loaded machine; a healthy start takes well under a second.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


async def run_p2pdeploy(*args: str, timeout_s: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """Run ``p2pdeploy ARGS`` to completion with this interpreter, its output captured.

    A command still running after ``timeout_s`` is killed and :class:`trio.TooSlowError` raised.
    """
    with trio.fail_after(timeout_s):
        return await trio.run_process(
            [sys.executable, "-m", "p2pdeploy.cli", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class ProcessOutputError(Exception):
    """A process did not print what was expected (it exited, or the wait timed out)."""


class JoinProcess:
    """One running ``p2pdeploy join`` and the lines it has printed so far."""

    def __init__(self, name: str, process: trio.Process, data_dir: Path) -> None:
        self.name = name
        self.process = process
        self.data_dir = data_dir
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.node_id_hex: str | None = None
        self.address: HostPort | None = None
        self._output_changed = trio.Event()
        self._stdout_closed = False
        self._open_pipes = 2
        self._output_read = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def peers_seen(self) -> dict[str, HostPort]:
        """The peers this node has reported (``peer HEX at HOST:PORT`` lines): id hex -> address."""
        peers = {}
        for line in self.stdout_lines:
            match = PEER_LINE.match(line)
            if match:
                peers[match.group(1)] = parse_host_port(match.group(2))
        return peers

    async def wait_for_line(self, accepts: Callable[[str], bool], timeout_s: float = START_TIMEOUT_S) -> str:
        """The first stdout line ``accepts``; raise :class:`ProcessOutputError` on exit or timeout."""
        seen = 0
        with trio.move_on_after(timeout_s):
            while True:
                changed = self._output_changed
                for line in self.stdout_lines[seen:]:
                    if accepts(line):
                        return line
                seen = len(self.stdout_lines)
                if self._stdout_closed:
                    raise ProcessOutputError(f"{self.name} closed its output first\n{self.transcript()}")
                await changed.wait()
        raise ProcessOutputError(f"{self.name}: no such line within {timeout_s} s\n{self.transcript()}")

    async def wait_until(
        self, condition: Callable[[JoinProcess], bool], timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Wait until ``condition(self)`` holds, re-checked whenever the process prints."""
        if not condition(self):
            await self.wait_for_line(lambda _line: condition(self), timeout_s)

    async def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> HostPort:
        """Wait for ``listening on HOST:PORT``; remembers the node's id and address."""
        line = await self.wait_for_line(LISTENING_LINE.match, timeout_s)
        match = LISTENING_LINE.match(line)
        assert match is not None
        self.address = parse_host_port(match.group(1))
        for earlier in self.stdout_lines:
            id_match = NODE_ID_LINE.match(earlier)
            if id_match:
                self.node_id_hex = id_match.group(1)
        return self.address

    def terminate(self) -> None:
        """Ask the node to stop (SIGTERM), as an operator or a service manager would."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit and for all it printed to be read; its exit status."""
        with trio.move_on_after(timeout_s):
            status = await self.process.wait()
            await self._output_read.wait()
            return status
        raise ProcessOutputError(f"{self.name} still running {timeout_s} s after being asked to stop")

    async def kill(self) -> None:
        """Kill and reap the process if it is still running (safe to call at any time)."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()

    def transcript(self) -> str:
        out = "\n".join(f"  | {line}" for line in self.stdout_lines)
        err = "\n".join(f"  ! {line}" for line in self.stderr_lines)
        return f"{self.name} (pid {self.pid}, exit {self.returncode}):\n{out}\n{err}".rstrip()

    async def _pump(self, stream: trio.abc.ReceiveStream, lines: list[str], is_stdout: bool) -> None:
        pending = b""
        try:
            async for chunk in stream:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    lines.extend(raw.decode("utf-8", "replace").rstrip("\r") for raw in complete)
                    self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if pending:
                lines.append(pending.decode("utf-8", "replace"))
            if is_stdout:
                self._stdout_closed = True
            self._open_pipes -= 1
            if self._open_pipes == 0:
                self._output_read.set()
            self._notify()
            await trio.aclose_forcefully(stream)

    def _notify(self) -> None:
        self._output_changed.set()
        self._output_changed = trio.Event()


class LocalProcesses:
    """The ``join`` processes started in one :func:`open_local_processes` block."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.processes: list[JoinProcess] = []

    async def start_join(
        self,
        data_dir: str | os.PathLike[str],
        *,
        bootstrap: Sequence[HostPort] = (),
        listen: HostPort = ("127.0.0.1", 0),
        name: str | None = None,
        extra_args: Sequence[str] = (),
        command_prefix: Sequence[str] = (),
    ) -> JoinProcess:
        """Start ``p2pdeploy join`` (it is not listening yet: see :meth:`JoinProcess.wait_listening`).

        ``command_prefix`` runs it through a command that execs it, so the process id is the
        node's: ``("ip", "netns", "exec", NAME)`` starts it in a network namespace."""
        command = [*command_prefix, sys.executable, "-m", "p2pdeploy.cli", "join", "--listen", format_host_port(listen)]
        command += ["--data-dir", os.fspath(data_dir)]
        for address in bootstrap:
            command += ["--bootstrap", format_host_port(address)]
        command += list(extra_args)
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        joined = JoinProcess(name or f"node {len(self.processes) + 1}", process, Path(data_dir))
        self.processes.append(joined)
        assert process.stdout is not None and process.stderr is not None
        self._nursery.start_soon(joined._pump, process.stdout, joined.stdout_lines, True)
        self._nursery.start_soon(joined._pump, process.stderr, joined.stderr_lines, False)
        return joined

    async def kill_all(self) -> None:
        for process in self.processes:
            await process.kill()


@asynccontextmanager
async def open_local_processes() -> AsyncIterator[LocalProcesses]:
    """Start processes in the block; whatever is still running when it ends is killed and reaped."""
    try:
        async with trio.open_nursery() as nursery:
            local = LocalProcesses(nursery)
            try:
                yield local
            finally:
                await local.kill_all()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
