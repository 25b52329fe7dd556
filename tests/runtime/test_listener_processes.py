"""A real ``p2pdeploy join`` process under a 1,024 descriptor limit, with 1,100 connections held
on each of its listeners (the TCP transport, the state API, the control socket): it stays up,
serves blob puts and gets, answers the state API, and keeps its memory bounded.

The attacker is this test process (its own limit raised); the node runs through ``prlimit``,
which execs it, so its process id is the node's.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
from contextlib import suppress

import psutil
import pytest
import trio

from p2pdeploy.runtime.control import control_socket_path
from p2pdeploy.runtime.framing import LENGTH_PREFIX, hello
from p2pdeploy.runtime.localnet import open_local_processes, run_p2pdeploy

HELD = 1100
NODE_DESCRIPTORS = 1024
#: Connections that announce an 8 MiB frame and send half of it (about 2 GB pinned at the old cap).
HALF_FRAMES = 60
#: What the node may grow by under the attack: the listeners' buffer totals and some slack.
MEMORY_GROWTH_BOUND_BYTES = 256 * 1024 * 1024
#: A connection the node's backlog has no room for is given up (the SYN would be retried for long).
CONNECT_TIMEOUT_S = 1.0


def raise_descriptor_limit(needed: int) -> None:
    """Let this process hold ``needed`` descriptors (up to its hard limit), or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def hold(connect, first_bytes: bytes, held: list) -> None:
    """Open a connection with ``connect`` and keep it, whatever the node does with it."""
    stream = None
    with suppress(OSError), trio.move_on_after(CONNECT_TIMEOUT_S):
        stream = await connect()
    if stream is None:
        return  # refused, or a full backlog: one fewer held
    held.append(stream)
    if first_bytes:
        with suppress(trio.BrokenResourceError, OSError):  # the node closed it already
            await stream.send_all(first_bytes)


async def connect_unix(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def limited_pair(local, tmp_path, descriptors: int):
    """A target node limited to ``descriptors`` open files and a peer joined through it, both in
    the overlay: ``(target, peer, the target's state API port)``."""
    limited = ("prlimit", f"--nofile={descriptors}:{descriptors}", "--")
    target = await local.start_join(tmp_path / "target", name="target", command_prefix=limited)
    seed = await target.wait_listening()
    peer = await local.start_join(tmp_path / "peer", bootstrap=[seed], name="peer")
    await peer.wait_listening()
    for node in (target, peer):
        await node.wait_for_line(lambda line: line.startswith("overlay joined"))
    status = await run_p2pdeploy("status", "--json", "--data-dir", str(tmp_path / "target"))
    return target, peer, int(json.loads(status.stdout)["state_url"].removeprefix("http://127.0.0.1:").split("/")[0])


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1) to limit the node's descriptors")
async def test_a_node_with_1024_descriptors_stays_up_and_serves_while_1100_connections_are_held_on_each_listener(
    tmp_path,
):
    raise_descriptor_limit(3 * HELD + 1024)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 2000)  # 512,000 bytes: two chunks and a manifest
    held: list[trio.SocketStream] = []
    async with open_local_processes() as local:
        target, _, state_port = await limited_pair(local, tmp_path, NODE_DESCRIPTORS)
        memory_before = psutil.Process(target.pid).memory_info().rss

        try:
            # The transport: a hello then half of an 8 MiB frame, then a hello and silence.
            half_frame = hello(9) + LENGTH_PREFIX.pack(8 << 20) + bytes(4 << 20)
            async with trio.open_nursery() as nursery:
                for _ in range(HALF_FRAMES):
                    nursery.start_soon(hold, lambda: trio.open_tcp_stream(*target.address), half_frame, held)
            for _ in range(HELD - HALF_FRAMES):
                await hold(lambda: trio.open_tcp_stream(*target.address), hello(9), held)
            # The state API: half a request head, then silence. The control socket: silence.
            for _ in range(HELD):
                await hold(lambda: trio.open_tcp_stream("127.0.0.1", state_port), b"GET /v1/state/k HTTP/1.1\r\n",
                           held)
            control = str(control_socket_path(tmp_path / "target"))
            for _ in range(HELD):
                await hold(lambda: connect_unix(control), b"", held)
            assert len(held) >= 3 * HELD * 0.9

            # Puts and gets through both nodes: the chunks travel over the target's listener.
            stored = await run_p2pdeploy("blob", "put", str(data), "--data-dir", str(tmp_path / "peer"),
                                         timeout_s=120)
            assert stored.returncode == 0, stored.stdout + stored.stderr
            assert b"2 copies of each" in stored.stdout, stored.stdout
            blob_id = stored.stdout.decode().split("blob ")[-1].split()[0]
            out = tmp_path / "got.bin"
            got = await run_p2pdeploy("blob", "get", blob_id, "--data-dir", str(tmp_path / "target"),
                                      "-o", str(out), timeout_s=120)
            assert got.returncode == 0, got.stdout + got.stderr
            assert out.read_bytes() == data.read_bytes()

            # The state API still answers (no token: 401), and a malformed header gets its 400.
            for request, status_line in ((b"GET /v1/state/k HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 401 "),
                                         ("GET /v1/state/k HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n".encode("latin-1"),
                                          b"HTTP/1.1 400 ")):
                stream = await trio.open_tcp_stream("127.0.0.1", state_port)
                async with stream:
                    await stream.send_all(request)
                    answer = b""
                    with trio.fail_after(30):
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                assert answer.startswith(status_line), answer

            assert target.returncode is None, target.transcript()
            growth = psutil.Process(target.pid).memory_info().rss - memory_before
            assert growth < MEMORY_GROWTH_BOUND_BYTES, f"the node grew by {growth} bytes"
            assert len(target.stderr_lines) < 50, target.transcript()
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)
        target.terminate()
        assert await target.wait_exit() == 0, target.transcript()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1) to limit the node's descriptors")
async def test_a_node_out_of_descriptors_backs_off_quietly_and_serves_again_when_they_are_freed(tmp_path):
    """With 200 descriptors the caps cannot save it: accepts fail with EMFILE. The node neither
    exits nor floods its log, and serves as soon as the connections are gone."""
    raise_descriptor_limit(2 * 400 + 1024)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 2000)
    held: list[trio.SocketStream] = []
    async with open_local_processes() as local:
        target, _, state_port = await limited_pair(local, tmp_path, 200)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(400):
                    nursery.start_soon(hold, lambda: trio.open_tcp_stream(*target.address), hello(9), held)
                    nursery.start_soon(hold, lambda: trio.open_tcp_stream("127.0.0.1", state_port),
                                       b"GET / HTTP/1.1\r\n", held)
            # Out of descriptors for a while (the listen backlogs hold what it cannot accept).
            with trio.fail_after(30):
                while not any("cannot accept" in line for line in target.stderr_lines):
                    await trio.sleep(0.05)
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)
        stored = await run_p2pdeploy("blob", "put", str(data), "--data-dir", str(tmp_path / "peer"), timeout_s=120)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        assert b"2 copies of each" in stored.stdout, stored.stdout
        status = await run_p2pdeploy("status", "--json", "--data-dir", str(tmp_path / "target"))
        counters = json.loads(status.stdout)["counters"]
        assert counters["tcp_inbound_accept_errors"] + counters.get("state_api_accept_errors", 0) > 0
        assert target.returncode is None, target.transcript()
        assert len(target.stderr_lines) < 30, target.transcript()
        target.terminate()
        assert await target.wait_exit() == 0, target.transcript()
