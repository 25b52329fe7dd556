"""Length-prefixed frames for the TCP path, and the hello that opens every connection.

A stream carries frames: a 4-byte big-endian length, then that many bytes (one encoded
message). The first frame a connection carries is a hello naming the sender's listening port,
because the source port of an outgoing connection is ephemeral and is not the peer's address:
frames that follow are handed to the core as coming from ``(peer host, advertised port)``.

Connections are one-way: a node writes only to the connections it opened and reads only from
the ones it accepted, so each side's answer travels on its own connection to the other's
listener, just as a datagram would.

:class:`FrameDecoder` is sans-I/O (bytes in, frames out) so the runtime's reader stays thin and
the parser can be tested without sockets. It never buffers more than one frame's limit.
"""

from __future__ import annotations

import struct

LENGTH_PREFIX = struct.Struct(">I")
#: The hello frame: magic, stream-framing version, the sender's listening port.
HELLO = struct.Struct(">4sBH")
HELLO_MAGIC = b"P2PD"
STREAM_VERSION = 1


class FrameTooLarge(Exception):
    """A peer announced a frame over the limit; the connection cannot be resynchronised."""

    def __init__(self, length: int, limit_bytes: int) -> None:
        super().__init__(f"frame of {length} bytes, limit {limit_bytes}")
        self.length = length
        self.limit_bytes = limit_bytes


class BadHello(Exception):
    """The first frame of a connection was not a valid hello."""


def frame(payload: bytes) -> bytes:
    """One frame carrying ``payload``."""
    return LENGTH_PREFIX.pack(len(payload)) + payload


def hello(listening_port: int) -> bytes:
    """The frame that opens a connection: who is writing, as the reader should address them."""
    return frame(HELLO.pack(HELLO_MAGIC, STREAM_VERSION, listening_port))


def parse_hello(payload: bytes) -> int:
    """The listening port a hello names; raises :class:`BadHello`."""
    if len(payload) != HELLO.size:
        raise BadHello(f"hello is {HELLO.size} bytes (got {len(payload)})")
    magic, version, port = HELLO.unpack(payload)
    if magic != HELLO_MAGIC:
        raise BadHello(f"bad magic {magic!r}")
    if version != STREAM_VERSION:
        raise BadHello(f"stream version {version}, this node speaks {STREAM_VERSION}")
    if port == 0:
        raise BadHello("listening port 0")
    return port


class FrameDecoder:
    """Splits a byte stream into frames of at most ``limit_bytes`` each.

    ``feed`` buffers what arrived; ``next_frame`` returns the frames in order and raises
    :class:`FrameTooLarge` only when it reaches the bad length, so frames received before it
    are still delivered. ``first_limit_bytes`` bounds the first frame separately, so a
    connection that must open with a small hello cannot make the reader buffer a bulk frame.
    """

    def __init__(self, limit_bytes: int, *, first_limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self._next_limit = limit_bytes if first_limit_bytes is None else first_limit_bytes
        self._buffer = bytearray()
        self._expected: int | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._expected is None:
            if len(self._buffer) < LENGTH_PREFIX.size:
                return None
            (length,) = LENGTH_PREFIX.unpack_from(self._buffer)
            if length > self._next_limit:
                raise FrameTooLarge(length, self._next_limit)
            self._next_limit = self.limit_bytes
            del self._buffer[: LENGTH_PREFIX.size]
            self._expected = length
        if len(self._buffer) < self._expected:
            return None
        payload = bytes(self._buffer[: self._expected])
        del self._buffer[: self._expected]
        self._expected = None
        return payload

    @property
    def expected_bytes(self) -> int | None:
        """The length the frame in progress announced, once its prefix is in (None before)."""
        return self._expected

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer) + (LENGTH_PREFIX.size if self._expected is not None else 0)
