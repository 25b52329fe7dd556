"""Stream framing and HOST:PORT parsing: the byte-level pieces of the runtime, without sockets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.runtime.address import format_host_port, parse_host_port
from p2pdeploy.runtime.framing import (
    HELLO,
    BadHello,
    FrameDecoder,
    FrameTooLarge,
    frame,
    hello,
    parse_hello,
)


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_frames_come_out_whole_however_the_stream_is_cut(payloads, cuts):
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder(limit_bytes=300)
    received = []
    start = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        decoder.feed(stream[start:cut])
        start = max(start, cut)
        received += drain(decoder)
    assert received == payloads
    assert decoder.pending_bytes == 0


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (payload := decoder.next_frame()) is not None:
        frames.append(payload)
    return frames


def test_a_frame_over_the_limit_is_refused_from_its_length_alone_after_the_frames_before_it():
    decoder = FrameDecoder(limit_bytes=100)
    decoder.feed(frame(b"first") + frame(bytes(101))[:4])
    assert decoder.next_frame() == b"first"
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_the_first_frame_has_its_own_limit_so_a_hello_cannot_be_a_bulk_frame():
    decoder = FrameDecoder(limit_bytes=1000, first_limit_bytes=HELLO.size)
    decoder.feed(frame(bytes(500)))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    decoder = FrameDecoder(limit_bytes=1000, first_limit_bytes=HELLO.size)
    decoder.feed(hello(7400) + frame(bytes(500)))
    assert drain(decoder) == [hello(7400)[4:], bytes(500)]


def test_hello_names_the_listening_port_and_rejects_anything_else():
    assert parse_hello(hello(7400)[4:]) == 7400
    for bad in (b"", b"nonsense", b"XXXX\x01\x1c\xe8", b"P2PD\x09\x1c\xe8", b"P2PD\x01\x00\x00"):
        with pytest.raises(BadHello):
            parse_hello(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_host_port_round_trips(text, expected):
    assert parse_host_port(text) == expected
    assert format_host_port(expected) == text


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("127.0.0.1", "no port"),
        (":7400", "no host"),
        ("host:http", "must be a number"),
        ("host:0", "between 1 and 65535"),
        ("host:70000", "between 1 and 65535"),
        ("::1:7400", "brackets"),
        ("[::1]7400", "[IPV6]:PORT"),
    ],
)
def test_bad_host_port_says_what_is_wrong(text, complaint):
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        parse_host_port(text)


def test_port_zero_is_for_listening_only():
    assert parse_host_port("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
