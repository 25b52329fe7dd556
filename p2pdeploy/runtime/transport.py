"""One UDP socket and one TCP listener on the same (host, port): how a real node meets the network.

Small messages (an encoded size up to ``wire.DATAGRAM_LIMIT_BYTES``) travel as one UDP datagram;
larger ones as a frame on a TCP stream (see :mod:`p2pdeploy.runtime.framing`). The transport
moves bytes only: the node decodes them and decides nothing about protocols.

Streams: one outgoing connection per peer, opened on the first large message to that peer,
reused for the ones after it and closed after ``tcp_idle_s`` without traffic. Each outgoing
connection has a bounded queue drained by its own task, so a slow peer delays only itself;
when the queue is full or the connection fails, the messages are dropped and counted, as a
lost datagram would be (the protocols above already cope with loss). Accepted connections are
read-only; the first frame must be a hello, and they are bounded by ``TransportConfig.inbound``
(:class:`~p2pdeploy.runtime.listeners.ListenerLimits`: connections in all and per source,
hello, idle and frame deadlines, bytes buffered for partial frames), so peers that hold
connections or half-send large frames cannot lock others out or pin memory.

Every task runs in the nursery of :meth:`Transport.run`; cancelling it stops them all and
closes the sockets.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pdeploy.runtime.address import HostPort, format_host_port
from p2pdeploy.runtime.framing import HELLO, BadHello, FrameDecoder, FrameTooLarge, frame, hello, parse_hello
from p2pdeploy.runtime.listeners import Connection, ConnectionGuard, ListenerLimits, RefusalLog, serve_bounded
from p2pdeploy.wire import DATAGRAM_LIMIT_BYTES, STREAM_LIMIT_BYTES

log = logging.getLogger(__name__)

#: Receive buffer for one datagram: the largest UDP payload, so an oversized one is seen whole.
DATAGRAM_RECEIVE_BYTES = 65536
STREAM_RECEIVE_BYTES = 65536
#: How many times to look for a port free for both UDP and TCP when the OS picks it.
BIND_ATTEMPTS = 32
#: Datagrams read in one go once the socket is readable, before other tasks get a turn.
RECEIVE_BATCH = 64

#: ``deliver(src, data, limit_bytes)``: bytes that arrived from ``src``, to decode with that limit.
Deliver = Callable[[HostPort, bytes, int], None]


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Tuning knobs of the transport (all have working defaults)."""

    stream_limit_bytes: int = STREAM_LIMIT_BYTES
    udp_send_queue: int = 4096
    tcp_send_queue: int = 64
    tcp_connect_timeout_s: float = 5.0
    #: An outgoing connection without traffic this long is closed (a new message opens another).
    tcp_idle_s: float = 30.0
    #: Bounds on accepted connections. Their idle timeout must exceed ``tcp_idle_s`` (a peer's
    #: quiet connection is closed by the peer first), and a connection must be allowed to buffer
    #: one frame (raise ``max_buffered_bytes_per_connection`` with ``stream_limit_bytes``).
    inbound: ListenerLimits = field(default_factory=ListenerLimits)


def path_for(size_bytes: int) -> str:
    """``"udp"`` or ``"tcp"``: the path a message of this encoded size takes."""
    return "udp" if size_bytes <= DATAGRAM_LIMIT_BYTES else "tcp"


async def bind_udp_and_tcp(host: str, port: int) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP socket and a listening TCP socket on the same ``(host, port)``.

    With port 0 the OS picks a UDP port and TCP tries the same number; when TCP cannot have it
    both are closed and a fresh port is tried. An explicit port that TCP cannot take is an error.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=stdlib_socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, _, _, _, sockaddr = infos[0]
    last_error: OSError | None = None
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        udp = trio.socket.socket(family, stdlib_socket.SOCK_DGRAM)
        try:
            await udp.bind(sockaddr)
            chosen_port = udp.getsockname()[1]
            tcp = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
            try:
                if hasattr(stdlib_socket, "SO_REUSEADDR"):  # rebind quickly after a restart
                    tcp.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
                await tcp.bind((sockaddr[0], chosen_port, *sockaddr[2:]))
                tcp.listen(128)
            except OSError as exc:
                tcp.close()
                last_error = exc
                udp.close()
                continue
        except BaseException:
            udp.close()
            raise
        return udp, tcp
    assert last_error is not None
    raise last_error


class Transport:
    """Sends and receives bytes for one node; see the module docstring for the paths."""

    def __init__(
        self,
        udp: trio.socket.SocketType,
        tcp: trio.socket.SocketType,
        deliver: Deliver,
        counters: Counter[str],
        config: TransportConfig | None = None,
    ) -> None:
        self.config = config or TransportConfig()
        self.counters = counters
        self._udp = udp
        self._listener = trio.SocketListener(tcp)
        self._deliver = deliver
        host, port = udp.getsockname()[:2]
        self.address: HostPort = (host, port)
        self.family = udp.family
        self._wildcard = host in ("0.0.0.0", "::")
        self._udp_out, self._udp_queue = trio.open_memory_channel[tuple[HostPort, bytes]](
            self.config.udp_send_queue
        )
        #: The UDP socket as a plain non-blocking socket (a duplicate descriptor of it): a datagram
        #: to a numeric address goes out at once and ready datagrams are read in a batch, without
        #: a task switch each; what would block goes through the trio socket and its queue.
        self._udp_raw = stdlib_socket.fromfd(udp.fileno(), udp.family, udp.type)
        self._udp_raw.setblocking(False)
        #: Datagrams queued for the sending task and not yet sent (direct sends wait behind them).
        self._udp_backlog = 0
        #: host -> True when it is a numeric address of our family (a name would need resolving).
        self._numeric: dict[str, bool] = {}
        self._stream_queues: dict[HostPort, trio.MemorySendChannel[bytes]] = {}
        self.inbound = ConnectionGuard("tcp_inbound", self.config.inbound, counters)
        self._refusals = RefusalLog(log)
        self._nursery: trio.Nursery | None = None

    @classmethod
    async def bind(
        cls, listen: HostPort, deliver: Deliver, counters: Counter[str], config: TransportConfig | None = None
    ) -> Transport:
        udp, tcp = await bind_udp_and_tcp(*listen)
        return cls(udp, tcp, deliver, counters, config)

    # -- lifetime ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` once both sockets are being read."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._receive_datagrams)
                nursery.start_soon(self._send_datagrams)
                await nursery.start(serve_bounded, self._listener, self._read_frames, self.inbound, self._refusals)
                task_status.started()
        finally:
            self._nursery = None
            self._udp_raw.close()
            self._udp.close()
            self._listener.socket.close()

    def close(self) -> None:
        """Close the sockets of a transport that was bound but never run."""
        self._udp_raw.close()
        self._udp.close()
        self._listener.socket.close()

    # -- sending -----------------------------------------------------------------------------
    def send(self, dst: HostPort, data: bytes) -> str:
        """Queue ``data`` for ``dst`` without waiting; returns the path it takes."""
        path = path_for(len(data))
        if self._nursery is None:
            self.counters["send_after_close"] += 1
            return path
        if path == "udp":
            if self._udp_backlog == 0 and self._is_numeric(dst[0]):
                try:
                    self._udp_raw.sendto(data, dst)
                except BlockingIOError:
                    pass  # the socket's buffer is full: queue it
                except OSError as exc:  # unreachable network, bad address: a lost datagram
                    self.counters["udp_send_error"] += 1
                    log.debug("datagram to %s failed: %s", format_host_port(dst), exc)
                    return path
                else:
                    self.counters["udp_sent"] += 1
                    return path
            try:
                self._udp_out.send_nowait((dst, data))
            except trio.WouldBlock:
                self.counters["send_queue_full"] += 1
            else:
                self._udp_backlog += 1
        else:
            self._send_stream(dst, data)
        return path

    def _is_numeric(self, host: str) -> bool:
        numeric = self._numeric.get(host)
        if numeric is None:
            try:
                stdlib_socket.inet_pton(self.family, host)
                numeric = True
            except (OSError, ValueError):
                numeric = False
            if len(self._numeric) < 4096:
                self._numeric[host] = numeric
        return numeric

    async def _send_datagrams(self) -> None:
        async for dst, data in self._udp_queue:
            try:
                await self._udp.sendto(data, dst)
            except OSError as exc:  # unreachable network, bad address: a lost datagram
                self.counters["udp_send_error"] += 1
                log.debug("datagram to %s failed: %s", format_host_port(dst), exc)
            else:
                self.counters["udp_sent"] += 1
            finally:
                self._udp_backlog -= 1

    def _send_stream(self, dst: HostPort, data: bytes) -> None:
        queue = self._stream_queues.get(dst)
        if queue is None:
            assert self._nursery is not None
            queue, receive = trio.open_memory_channel[bytes](self.config.tcp_send_queue)
            self._stream_queues[dst] = queue
            self._nursery.start_soon(self._run_stream_sender, dst, queue, receive)
        try:
            queue.send_nowait(data)
        except trio.WouldBlock:
            self.counters["send_queue_full"] += 1

    async def _run_stream_sender(
        self, dst: HostPort, queue: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        stream: trio.SocketStream | None = None
        try:
            local = None if self._wildcard else self.address[0]
            with trio.fail_after(self.config.tcp_connect_timeout_s):
                stream = await trio.open_tcp_stream(dst[0], dst[1], local_address=local)
            self.counters["tcp_connections_opened"] += 1
            await stream.send_all(hello(self.address[1]))
            failure: BaseException | None = None
            async with trio.open_nursery() as nursery:
                # The peer never writes on this stream: anything it does means it closed (or died).
                # Noticing at once keeps a later message from going into a dead connection, whose
                # address a new node may hold by now.
                nursery.start_soon(self._watch_outbound, dst, stream, nursery.cancel_scope)
                try:
                    await self._pump_frames(stream, receive)
                except (OSError, trio.BrokenResourceError) as exc:  # caught here: a nursery would wrap it
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
            lost = receive.statistics().current_buffer_used
            if lost:  # the peer closed while messages waited
                self.counters["tcp_send_error"] += lost
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            lost = 1 + receive.statistics().current_buffer_used
            self.counters["tcp_send_error"] += lost
            log.debug("stream to %s failed (%d messages lost): %r", format_host_port(dst), lost, exc)
        finally:
            # Forget this connection before any await, so a message sent from now on opens a new one.
            if self._stream_queues.get(dst) is queue:
                del self._stream_queues[dst]
            receive.close()
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _pump_frames(self, stream: trio.SocketStream, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        """Send queued messages as frames until the connection has been idle for ``tcp_idle_s``."""
        while True:
            data = None
            with trio.move_on_after(self.config.tcp_idle_s):
                data = await receive.receive()
            if data is None:
                if receive.statistics().current_buffer_used == 0:
                    return  # idle: close; the next large message opens a new connection
                continue
            await stream.send_all(frame(data))
            self.counters["tcp_sent"] += 1

    async def _watch_outbound(self, dst: HostPort, stream: trio.SocketStream, sender: trio.CancelScope) -> None:
        try:
            while await stream.receive_some(STREAM_RECEIVE_BYTES):
                self.counters["tcp_unexpected_data"] += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.counters["tcp_closed_by_peer"] += 1
        log.debug("stream to %s closed by the peer", format_host_port(dst))
        sender.cancel()

    # -- receiving ---------------------------------------------------------------------------
    async def _receive_datagrams(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        raw = self._udp_raw
        while True:
            await trio.lowlevel.wait_readable(raw)
            for _ in range(RECEIVE_BATCH):  # then other tasks get a turn
                try:
                    data, src = raw.recvfrom(DATAGRAM_RECEIVE_BYTES)
                except BlockingIOError:
                    break
                except ConnectionError:  # an ICMP error reported on some platforms: not for us to act on
                    self.counters["udp_receive_error"] += 1
                    continue
                self.counters["udp_received"] += 1
                self._deliver((src[0], src[1]), data, DATAGRAM_LIMIT_BYTES)

    async def _read_frames(self, stream: trio.SocketStream, connection: Connection) -> None:
        """Frames from one accepted connection, hello first; any refusal closes the connection."""
        peer_host = connection.source
        if peer_host == "?":
            return  # reset before its address could be read: nothing to answer to
        limit = self.config.stream_limit_bytes
        decoder = FrameDecoder(limit, first_limit_bytes=HELLO.size)
        src: HostPort | None = None
        while True:
            data = await connection.receive_some(stream, STREAM_RECEIVE_BYTES)
            if data is None:
                self.counters["tcp_timeout" if src is not None else "bad_hello"] += 1
                return
            if not data:
                return  # the peer closed its side
            decoder.feed(data)
            while True:
                try:
                    payload = decoder.next_frame()
                except FrameTooLarge as exc:
                    self.counters["oversized" if src is not None else "bad_hello"] += 1
                    self._refusals.debug("tcp oversized", "closing stream from %s: %s", peer_host, exc)
                    return
                if payload is None:
                    expected = decoder.expected_bytes
                    if expected is not None and connection.buffered_bytes == 0 and expected > 0:
                        # Reserved at the length prefix: a frame larger than what is left is refused
                        # before its bytes are buffered.
                        if not connection.reserve(expected):
                            self._refusals.debug("tcp buffer", "closing stream from %s: no room for a frame "
                                                 "of %d bytes", peer_host, expected)
                            return
                        connection.begin_message()
                    break
                connection.release_buffer()
                connection.completed_message()
                if src is None:
                    try:
                        src = (peer_host, parse_hello(payload))
                    except BadHello as exc:
                        self.counters["bad_hello"] += 1
                        self._refusals.debug("tcp bad hello", "closing stream from %s: %s", peer_host, exc)
                        return
                    continue
                self.counters["tcp_received"] += 1
                self._deliver(src, payload, limit)
