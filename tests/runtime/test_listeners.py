"""Bounds on every listener: connections held, frames half-sent, silence, descriptor exhaustion,
and the rate limit on refusal lines. Real sockets on 127.0.0.1 against in-process nodes."""

from __future__ import annotations

import errno
import io
import logging
import os
from collections import Counter

import trio

from p2pdeploy.cli import AbsolutePath
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.runtime import node as node_module
from p2pdeploy.runtime.framing import LENGTH_PREFIX, frame, hello
from p2pdeploy.runtime.listeners import ConnectionGuard, ListenerLimits, RefusalLog, serve_bounded
from p2pdeploy.runtime.node import RuntimeConfig, RuntimeNode, open_node
from p2pdeploy.runtime.transport import TransportConfig

from .test_listener_processes import raise_descriptor_limit

BOUND_S = 30.0


def limits(**changes: object) -> ListenerLimits:
    values: dict[str, object] = dict(max_connections=8, max_connections_per_source=8, header_timeout_s=10.0,
                                     idle_timeout_s=60.0, message_timeout_s=60.0,
                                     max_buffered_bytes_per_connection=1 << 20, max_buffered_bytes_total=4 << 20)
    values.update(changes)
    return ListenerLimits(**values)  # type: ignore[arg-type]


def inbound(**changes: object) -> RuntimeConfig:
    return RuntimeConfig(transport=TransportConfig(inbound=limits(**changes)))


async def held_connection(address: tuple[str, int], first_bytes: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*address)
    if first_bytes:
        await stream.send_all(first_bytes)
    return stream


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """True once the other side has closed ``stream`` (whatever it sent before)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def wait_for(condition, bound_s: float = BOUND_S) -> None:
    with trio.fail_after(bound_s):
        while not condition():
            await trio.sleep(0.01)


async def test_connections_held_open_past_the_cap_do_not_lock_a_peer_out():
    """300 connections that sent a hello and then nothing, on the default cap of 256: a peer's
    large ping still gets through, because a new connection replaces the quietest one."""
    raise_descriptor_limit(2048)
    async with open_node() as target, open_node() as peer:
        held = [await held_connection(target.address, hello(9)) for _ in range(300)]
        try:
            await wait_for(lambda: target.counters["tcp_inbound_accepted"] >= 300)
            pong = await peer.ping_pong(target.address, bytes(5000), timeout_s=10)
            assert pong.node_id == target.node_id
            assert target.counters["tcp_inbound_evicted"] >= 300 - 256
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)


async def test_a_connection_that_goes_quiet_is_closed_after_the_idle_timeout():
    async with open_node(config=inbound(idle_timeout_s=0.2)) as target:
        stream = await held_connection(target.address, hello(9))
        with trio.fail_after(BOUND_S):
            assert await closed_by_peer(stream)
        assert target.counters["tcp_inbound_timeouts"] == 1


async def test_a_frame_larger_than_a_connection_may_buffer_is_refused_at_its_length_prefix():
    async with open_node(config=inbound(max_buffered_bytes_per_connection=64 * 1024)) as target:
        stream = await held_connection(target.address, hello(9) + LENGTH_PREFIX.pack(100_000))
        with trio.fail_after(BOUND_S):
            assert await closed_by_peer(stream)  # before a byte of the frame was sent
        assert target.counters["tcp_inbound_buffer_refused"] == 1


async def test_half_sent_frames_never_hold_more_than_the_listeners_total():
    """Each connection announces a 1 MiB frame and sends half of it; with 4 MiB in all, every new
    one past the fourth makes the oldest give way, and a peer's frame still gets through."""
    config = inbound(max_connections=64, max_connections_per_source=64, max_buffered_bytes_total=4 << 20)
    async with open_node(config=config) as target, open_node() as peer:
        held = []
        for _ in range(12):
            stream = await held_connection(target.address, hello(9) + LENGTH_PREFIX.pack(1 << 20))
            await stream.send_all(bytes(1 << 19))
            held.append(stream)
        try:
            await wait_for(lambda: target.counters["tcp_inbound_evicted"] >= 8)
            pong = await peer.ping_pong(target.address, bytes(200_000), timeout_s=10)
            assert pong.node_id == target.node_id
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)


def test_the_oldest_partial_frame_yields_when_the_listeners_total_is_short():
    counters: Counter[str] = Counter()
    guard = ConnectionGuard("test", limits(max_connections=64, max_connections_per_source=64), counters)
    connections = []
    for now in range(12):
        connection = guard.admit("10.0.0.1", float(now))
        assert connection is not None
        connection.message_deadline = float(now)  # begun in this order
        assert connection.reserve(1 << 20)
        connections.append(connection)
        assert guard.buffered_bytes <= 4 << 20
    assert [c.evicted for c in connections] == [True] * 8 + [False] * 4
    assert counters["test_evicted"] == 8 and guard.buffered_bytes == 4 << 20
    assert not connections[-1].reserve((1 << 20) + 1)  # over what one connection may buffer
    assert counters["test_buffer_refused"] == 1


def test_a_connection_over_a_cap_replaces_the_quietest_unless_all_are_busy():
    counters: Counter[str] = Counter()
    guard = ConnectionGuard("test", limits(max_connections=4, max_connections_per_source=2), counters)
    first, second = guard.admit("a", 0.0), guard.admit("a", 1.0)
    third = guard.admit("a", 2.0)  # over the per-source cap: the quietest of "a" goes
    assert first is not None and first.evicted and second is not None and third is not None
    second.busy = third.busy = True
    assert guard.admit("a", 3.0) is None and counters["test_refused"] == 1
    others = [guard.admit("b", 4.0), guard.admit("c", 5.0)]
    assert all(c is not None for c in others) and len(guard.connections) == 4
    newcomer = guard.admit("d", 6.0)  # over the listener's cap: the quietest idle one goes
    assert newcomer is not None and others[0] is not None and others[0].evicted


async def test_a_flood_of_bad_hellos_is_counted_and_logged_once_per_interval(caplog):
    caplog.set_level(logging.DEBUG, logger="p2pdeploy.runtime")
    async with open_node() as target:
        for _ in range(50):
            stream = await held_connection(target.address, frame(b"not a hello"))
            with trio.fail_after(BOUND_S):
                await closed_by_peer(stream)
        await wait_for(lambda: target.counters["bad_hello"] == 50)
    lines = [r for r in caplog.records if "closing stream" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


class ExhaustedListener(trio.abc.Listener[trio.SocketStream]):
    """A listener whose every accept fails as it does when the process is out of descriptors."""

    def __init__(self) -> None:
        self.accepts = 0

    async def accept(self) -> trio.SocketStream:
        self.accepts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_backs_off_when_descriptors_run_out_and_says_so_once_per_interval(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    counters: Counter[str] = Counter()
    listener = ExhaustedListener()
    guard = ConnectionGuard("test", limits(), counters)

    async def never(stream, connection):
        raise AssertionError("nothing is accepted")

    with trio.move_on_after(60):
        await serve_bounded(listener, never, guard, RefusalLog(logging.getLogger("test")))  # type: ignore[arg-type]
    assert counters["test_accept_errors"] == listener.accepts
    assert listener.accepts <= 70  # a second between tries once backed off, not a spin
    lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert 1 <= len(lines) <= 7


async def test_a_failed_machine_probe_is_counted_and_logged_and_the_node_keeps_serving(tmp_path, monkeypatch):
    real_probe = node_module.probe_machine
    calls = 0

    def probe_out_of_descriptors(directory):
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_probe(directory)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(node_module, "probe_machine", probe_out_of_descriptors)
    config = RuntimeConfig(machine_probe_interval_s=0.01)
    async with open_node(data_dir=tmp_path, contribution=Contribution(), config=config) as target, \
            open_node() as peer:
        await wait_for(lambda: target.counters["probe_errors"] >= 5)
        assert (await peer.ping_pong(target.address, b"", timeout_s=10)).node_id == target.node_id
        assert target.machine is not None


def test_refusal_lines_are_one_per_reason_per_interval_with_the_count_suppressed(caplog):
    now = 0.0
    refusals = RefusalLog(logging.getLogger("test.refusals"), interval_s=10.0, clock=lambda: now)
    caplog.set_level(logging.INFO, logger="test.refusals")
    for _ in range(1000):
        refusals.log(logging.INFO, "bad token", "refused a request: %s", "bad token")
        refusals.log(logging.INFO, "too large", "refused a request: %s", "too large")
    now = 10.5
    refusals.log(logging.INFO, "bad token", "refused a request: %s", "bad token")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a request: bad token",
        "refused a request: too large",
        "refused a request: bad token (and 999 more like it suppressed)",
    ]


def test_paths_given_on_the_command_line_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert AbsolutePath(file_okay=False).convert("data", None, None) == str(tmp_path / "data")
    node = RuntimeNode(Identity.generate(), data_dir="data")
    assert node.data_dir == tmp_path / "data"


async def test_a_handler_that_breaks_ends_its_connection_only(caplog):
    counters: Counter[str] = Counter()
    guard = ConnectionGuard("test", limits(), counters)
    served = []

    async def handler(stream, connection):
        served.append(connection.source)
        if len(served) == 1:
            raise ValueError("a defect some input reached")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_bounded, listeners[0], handler, guard, RefusalLog(logging.getLogger("test")))
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(BOUND_S):
                assert await closed_by_peer(stream)
        nursery.cancel_scope.cancel()
    assert served == ["127.0.0.1", "127.0.0.1"] and counters["test_failed"] == 1
    assert not guard.connections


async def test_joins_refusal_lines_are_summarized_per_request_and_check():
    from rich.console import Console

    from p2pdeploy.resource.protocol import RequestRefused
    from p2pdeploy.runtime.commands import _report_events

    output = io.StringIO()
    send, receive = trio.open_memory_channel[object](1000)
    for i in range(500):
        send.send_nowait(RequestRefused(("127.0.0.1", 9000 + i), "StartReplica", "trust", "untrusted key"))
        send.send_nowait(RequestRefused(("127.0.0.1", 9000 + i), "StopReplica", "signature", "bad signature"))
    send.close()
    await _report_events(receive, None, Console(file=output, soft_wrap=True))  # type: ignore[arg-type]
    assert output.getvalue().splitlines() == [
        "refused StartReplica from 127.0.0.1:9000: untrusted key",
        "refused StopReplica from 127.0.0.1:9000: bad signature",
    ]
