"""The trio runtime with real sockets on 127.0.0.1, many nodes in one process.

Waits poll a condition with a generous bound; tests where time matters run on trio's
``MockClock`` (the ``autojump_clock`` fixture), so a 1 s protocol timeout takes no real time.
"""

from __future__ import annotations

import socket
import stat
import struct
from collections import Counter
from dataclasses import dataclass

import cbor2
import pytest
import trio

from p2pdeploy import wire
from p2pdeploy.core import Protocol
from p2pdeploy.node import CoreContext, default_layers
from p2pdeploy.overlay.ping import MIN_RTO_S, PeerSeen, Ping, PingProtocol, PongReceived
from p2pdeploy.runtime.framing import LENGTH_PREFIX, frame, hello
from p2pdeploy.runtime.node import NodeNotRunning, PingTimeout, RuntimeConfig, open_node
from p2pdeploy.runtime.transport import Transport, TransportConfig

LOOPBACK = ("127.0.0.1", 0)
WAIT_BOUND_S = 30.0


async def wait_for(condition, timeout_s: float = WAIT_BOUND_S) -> None:
    """Poll ``condition()`` until it holds; fail after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.005)
        return
    pytest.fail(f"condition still false after {timeout_s} s")


async def test_ten_nodes_in_one_process_all_ping_each_other_over_udp():
    async with trio.open_nursery() as nursery:
        nodes = []
        for _ in range(10):
            nodes.append(await nursery.start(_serve_node))
        rtts_s: dict[tuple[int, int], float] = {}

        async def ping(i: int, j: int) -> None:
            rtts_s[i, j] = await nodes[i].ping(nodes[j].address, timeout_s=WAIT_BOUND_S)

        async with trio.open_nursery() as pings:
            for i in range(10):
                for j in range(10):
                    if i != j:
                        pings.start_soon(ping, i, j)
        assert len(rtts_s) == 90 and all(rtt > 0 for rtt in rtts_s.values())
        for i, node in enumerate(nodes):
            others = {other.address: other.node_id for j, other in enumerate(nodes) if j != i}
            assert node.peers == others
            assert node.counters["tcp_sent"] == 0  # empty pings are datagrams
            assert node.counters["udp_sent"] == 18  # 9 pings and 9 pongs
        nursery.cancel_scope.cancel()


async def _serve_node(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # ping only: the counters below count pings and pongs, not what other layers would send
    async with open_node(LOOPBACK, layers=lambda c: [PingProtocol(c.identity.node_id, c.rng, own_address=c.address)]) as node:
        task_status.started(node)
        await trio.sleep_forever()


async def test_a_ping_over_1200_bytes_goes_by_tcp_and_its_rtt_comes_back():
    async with open_node(LOOPBACK) as a, open_node(LOOPBACK) as b:
        payload = bytes(5000)
        assert a.path_of(Ping(0, a.node_id, payload)) == "tcp"
        pong = await a.ping_pong(b.address, payload)
        assert pong.rtt_s > 0 and pong.payload_bytes == 5000 and pong.node_id == b.node_id
        assert (a.counters["tcp_sent"], b.counters["tcp_received"]) == (1, 1)  # the ping
        assert (b.counters["tcp_sent"], a.counters["tcp_received"]) == (1, 1)  # the pong
        assert a.counters["udp_sent"] == b.counters["udp_sent"] == 0
        # The connection is reused for the next large message to the same peer.
        await a.ping(b.address, payload)
        assert a.counters["tcp_connections_opened"] == 1 and a.counters["tcp_sent"] == 2


async def test_the_largest_datagram_ping_still_goes_by_udp():
    async with open_node(LOOPBACK) as a, open_node(LOOPBACK) as b:
        overhead = len(wire.encode(Ping(2**62, a.node_id, b""))) + 2  # the byte string's length grows
        payload = bytes(wire.DATAGRAM_LIMIT_BYTES - overhead)
        assert len(wire.encode(Ping(2**62, a.node_id, payload))) <= wire.DATAGRAM_LIMIT_BYTES
        await a.ping(b.address, payload)
        assert a.counters["udp_sent"] == 1 and a.counters["tcp_sent"] == 0


async def test_bad_datagrams_are_counted_by_kind_and_dropped_while_the_node_keeps_answering():
    garbage = {
        "malformed": [
            b"\xff\x00garbage",
            cbor2.dumps({"not": "an envelope"}),
            cbor2.dumps([1, 1, ["x", 1, b""]]),
        ],
        "oversized": [bytes(wire.DATAGRAM_LIMIT_BYTES + 1)],
        "unknown_type": [cbor2.dumps([wire.VERSION, 65000, []])],
        "bad_version": [cbor2.dumps([wire.VERSION + 98, 1, []])],
    }
    async with open_node(LOOPBACK) as node, open_node(LOOPBACK) as peer:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for datagrams in garbage.values():
                for data in datagrams:
                    await attacker.sendto(data, node.address)
        expected = {kind: len(datagrams) for kind, datagrams in garbage.items()}
        await wait_for(lambda: {kind: node.counters[kind] for kind in expected} == expected)
        assert await peer.ping(node.address) > 0
        assert node.peers == {peer.address: peer.node_id}


async def test_an_oversized_stream_frame_is_counted_and_its_connection_closed():
    small = RuntimeConfig(transport=TransportConfig(stream_limit_bytes=4096))
    async with open_node(LOOPBACK, config=small) as node, open_node(LOOPBACK) as peer:
        stream = await trio.open_tcp_stream(*node.address)
        async with stream:
            await stream.send_all(hello(peer.address[1]) + frame(cbor2.dumps([1, 1, "junk"])))
            await stream.send_all(LENGTH_PREFIX.pack(4097) + bytes(100))
            with trio.fail_after(WAIT_BOUND_S):
                while await _receive_or_reset(stream):
                    pass  # the node sends nothing; it closes once it sees the length
        assert node.counters["malformed"] == 1 and node.counters["oversized"] == 1
        assert await peer.ping(node.address, bytes(2000)) > 0  # and it still takes frames within the limit
        with pytest.raises(ValueError, match="over the limit of 4096"):
            await node.ping(peer.address, bytes(5000))


async def _receive_or_reset(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(1024)
    except trio.BrokenResourceError:
        return b""


async def test_a_stream_that_does_not_open_with_a_hello_is_closed():
    async with open_node(LOOPBACK) as node:
        async with await trio.open_tcp_stream(*node.address) as stream:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            with trio.fail_after(WAIT_BOUND_S):
                while await _receive_or_reset(stream):
                    pass
        assert node.counters["bad_hello"] == 1


async def test_a_node_joins_through_its_bootstrap_and_both_see_each_other():
    async with open_node(LOOPBACK) as first:
        await first.wait_joined()  # its own overlay join (alone: no contacts) is over
        with first.subscribe() as events:
            async with open_node(LOOPBACK, bootstrap=[("localhost", first.address[1])]) as second:
                rtts = await second.wait_joined()
                assert (
                    list(rtts) == [("localhost", first.address[1])]
                    and rtts["localhost", first.address[1]] > 0
                )
                assert second.peers == {first.address: first.node_id}
                assert first.peers == {second.address: second.node_id}
                assert events.receive_nowait() == PeerSeen(second.address, second.node_id)


async def test_a_ping_nobody_answers_times_out_after_the_protocols_rto(autojump_clock):
    async with open_node(LOOPBACK) as node:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            await silent.bind(LOOPBACK)
            with pytest.raises(PingTimeout, match="no pong from 127.0.0.1") as caught:
                await node.ping(silent.getsockname())
            assert caught.value.waited_s == pytest.approx(1.0)  # the initial RTO of RFC 6298
            with pytest.raises(PingTimeout):
                await node.ping(silent.getsockname(), timeout_s=MIN_RTO_S / 2)
            assert isinstance(caught.value, TimeoutError)


async def test_a_silent_bootstrap_is_given_up_after_the_configured_attempts(autojump_clock):
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        await silent.bind(LOOPBACK)
        async with open_node(LOOPBACK, bootstrap=[silent.getsockname()]) as node:
            assert await node.wait_joined() == {silent.getsockname(): None}
            assert node.core.layer(PingProtocol).stats.sent == RuntimeConfig().join_attempts


@dataclass(frozen=True, slots=True)
class BeaconFired:
    at: float
    deadline: float


class Beacon(Protocol):
    """A test layer: at a set time it pings a peer on its own; shows timers and sends are driven."""

    def __init__(self, node_id: int, target, fire_at: float) -> None:
        super().__init__()
        self.node_id = node_id
        self.target = target
        self.fire_at = fire_at
        self.set_timer("fire", fire_at)

    def on_timer(self, name, now: float) -> None:
        self.emit(BeaconFired(now, self.fire_at))
        self.send(self.target, Ping(7, self.node_id))


async def test_a_layer_added_by_the_factory_gets_its_timer_at_its_deadline_and_its_messages_sent(
    autojump_clock,
):
    async with open_node(LOOPBACK) as peer:

        def layers(context: CoreContext) -> list[Protocol]:
            return [
                *default_layers(context),
                Beacon(context.identity.node_id, peer.address, context.now + 5.0),
            ]

        async with open_node(LOOPBACK, layers=layers) as node:
            await node.wait_joined()
            with node.subscribe() as events:
                started = trio.current_time()
                fired = await events.receive()
                assert isinstance(fired, BeaconFired) and fired.at >= fired.deadline
                assert fired.at == pytest.approx(started + 5.0, abs=0.01)
                # The peer answers the beacon's ping; nobody here asked for that pong.
                await wait_for(lambda: node.core_counters().get("PingProtocol.unsolicited_pong") == 1)
                assert peer.peers == {node.address: node.node_id}


async def test_identity_is_kept_in_the_data_dir_with_a_private_key_file(tmp_path):
    async with open_node(LOOPBACK, data_dir=tmp_path) as node:
        first_id, created = node.node_id, node.identity_created
    async with open_node(LOOPBACK, data_dir=tmp_path) as node:
        assert (node.node_id, node.identity_created) == (first_id, False)
    assert created
    assert stat.S_IMODE((tmp_path / "identity.key").stat().st_mode) == 0o600


async def test_events_reach_subscribers_and_pongs_carry_the_peer_id():
    async with open_node(LOOPBACK) as a, open_node(LOOPBACK) as b, trio.open_nursery() as nursery:
        with a.subscribe() as events:
            nursery.start_soon(a.ping, b.address)
            seen = [await events.receive(), await events.receive()]
        assert isinstance(seen[0], PeerSeen) and isinstance(seen[1], PongReceived)
        assert seen[1].node_id == b.node_id


async def test_an_address_taken_by_another_node_cannot_be_listened_on():
    async with open_node(LOOPBACK) as node:
        with pytest.raises(OSError):
            async with open_node(node.address):
                pass


async def test_the_facade_refuses_work_once_the_node_has_stopped():
    async with open_node(LOOPBACK) as node:
        address = node.address
    assert node.address == address
    with pytest.raises(NodeNotRunning):
        await node.ping(address)


async def test_an_unresolvable_host_is_a_clear_error():
    async with open_node(LOOPBACK) as node:
        with pytest.raises(ValueError, match="cannot resolve no-such-host.invalid:7400"):
            await node.ping(("no-such-host.invalid", 7400))


async def test_a_node_on_the_address_of_one_that_stopped_gets_its_answers_over_tcp():
    """b's connection to the stopped node must not carry the answers meant for the new one."""
    payload = bytes(3000)  # over a datagram: ping and pong go by TCP
    async with open_node(LOOPBACK) as b:
        async with open_node(LOOPBACK) as first:
            await first.ping(b.address, payload, timeout_s=WAIT_BOUND_S)
            address = first.address
        await wait_for(lambda: b.counters["tcp_closed_by_peer"] == 1)
        async with open_node(address) as second:
            for _ in range(2):
                pong = await second.ping_pong(b.address, payload, timeout_s=WAIT_BOUND_S)
                assert pong.node_id == b.node_id
        assert b.counters["tcp_send_error"] == 0


async def test_a_peer_that_resets_a_busy_stream_costs_its_messages_not_the_transport():
    """Large messages pile up for a peer that does not read; it resets the connection. Whether
    the reset reaches the sender in a send or through the stream's watcher, the messages are
    counted lost and the transport carries on (a later message opens a new connection)."""
    for _ in range(5):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        address = server.getsockname()
        counters: Counter[str] = Counter()
        transport = await Transport.bind(LOOPBACK, lambda *received: None, counters)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.run)
                for _ in range(20):
                    transport.send(address, b"x" * 200_000)
                with trio.fail_after(WAIT_BOUND_S):
                    while True:
                        try:
                            connection, _ = server.accept()
                            break
                        except BlockingIOError:
                            await trio.sleep(0.01)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()  # a reset, with the sender's frames unread
                await wait_for(lambda counters=counters: counters["tcp_send_error"] == 20)
                transport.send(address, b"y" * 200_000)  # a new connection for the next message
                with trio.fail_after(WAIT_BOUND_S):
                    while True:
                        try:
                            server.accept()[0].close()
                            break
                        except BlockingIOError:
                            await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            server.close()
