"""Health checks against a running replica: TCP connect, HTTP GET, or a command.

The HTTP check is a minimal HTTP/1.0 GET over a trio TCP stream (no client library): a status
from 200 to 399 passes. Each check is bounded by its ``timeout_s`` with a cancel scope; a
command check runs in the replica's sandbox and its whole process group is killed on timeout.
Every function returns ``(ok, detail)`` and never raises for a failing service.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Mapping

import trio

MAX_RESPONSE_HEAD_BYTES = 16 * 1024


async def check_tcp(port: int, timeout_s: float, host: str = "127.0.0.1") -> tuple[bool, str]:
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return False, _connect_error(exc, port)
        await stream.aclose()
        return True, f"port {port} accepts connections"
    return False, f"no connection to port {port} within {timeout_s:g} s"


async def check_http(port: int, path: str, timeout_s: float, host: str = "127.0.0.1") -> tuple[bool, str]:
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return False, _connect_error(exc, port)
        try:
            request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: p2pdeploy-health\r\n\r\n"
            await stream.send_all(request.encode("ascii"))
            head = b""
            while b"\r\n" not in head and len(head) < MAX_RESPONSE_HEAD_BYTES:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        except (trio.BrokenResourceError, OSError) as exc:
            return False, f"HTTP GET {path} failed: {exc}"
        finally:
            await stream.aclose()
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", errors="replace")
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return False, f"HTTP GET {path}: not an HTTP response ({status_line[:60]!r})"
        status = int(parts[1])
        if 200 <= status < 400:
            return True, f"HTTP {status}"
        return False, f"HTTP GET {path} answered {status}"
    return False, f"HTTP GET {path} got no answer within {timeout_s:g} s"


async def open_in_session(
    argv: list[str], env: Mapping[str, str], stdin_data: bytes, output: int = subprocess.DEVNULL
) -> trio.Process:
    """Start ``argv`` (the launcher) in a new session with ``env``, ``stdin_data`` (its plan) on its
    standard input, and its stdout and stderr to ``output``: a replica's process and its command
    checks start alike, each the leader of a process group that one ``killpg`` ends with all it
    spawned."""
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=output,
        stderr=output,
        env=env,
        start_new_session=True,
    )
    assert process.stdin is not None
    try:
        # A launcher that dies before reading its plan says why on stderr and exits: not ours to raise.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with process.stdin:
                await process.stdin.send_all(stdin_data)
    except BaseException:  # cancelled meanwhile: the caller never gets the process, so end it here
        with trio.CancelScope(shield=True):
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        raise
    return process


async def check_command(
    argv: list[str], env: Mapping[str, str], plan: bytes, timeout_s: float
) -> tuple[bool, str]:
    """Run ``argv`` (the launcher, given ``plan``) in a new session; kill its group on timeout."""
    try:
        process = await open_in_session(argv, env, plan)
    except OSError as exc:
        return False, f"cannot run the health command: {exc.strerror}"
    finished = False
    try:
        with trio.move_on_after(timeout_s):
            code = await process.wait()
            finished = True
            return (code == 0), f"health command exited with code {code}"
        return False, f"health command did not finish within {timeout_s:g} s"
    finally:
        if not finished:  # the leader is not reaped yet, so its group id cannot have been reused
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


def _connect_error(exc: BaseException, port: int) -> str:
    causes = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):  # trio gathers the error of every address it tried
        causes.extend(cause.exceptions)
    elif cause is not None:
        causes.append(cause)
    if any(isinstance(c, OSError) and c.errno == errno.ECONNREFUSED for c in causes):
        return f"connection to port {port} refused"
    return f"cannot connect to port {port}: {causes[-1]}"
