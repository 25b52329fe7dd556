"""The wire codec: round trips, and every kind of bad input is a typed error, never an exception."""

import dataclasses
from dataclasses import dataclass

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.overlay.ping import Ping, Pong
from p2pdeploy.wire import DATAGRAM_LIMIT_BYTES, DecodeError, NodeId, WireError, decode, encode


@wire.record
class _Contact:
    node_id: NodeId
    address: wire.Address


@wire.message(60001)
class _Sample:
    """A test message that uses every kind of field the schema checker knows."""

    key: NodeId
    count: int
    ratio: float
    name: str
    blob: bytes
    flag: bool
    contacts: list[_Contact]
    pair: tuple[int, str]
    maybe: int | None
    attrs: dict[str, int]


ids = st.integers(min_value=0, max_value=(1 << 160) - 1)
addresses = st.one_of(
    st.tuples(st.text(max_size=20), st.integers(min_value=0, max_value=65535)),
    st.integers(min_value=0, max_value=10**6),
)
samples = st.builds(
    _Sample,
    key=ids,
    count=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ratio=st.floats(allow_nan=False),
    name=st.text(max_size=30),
    blob=st.binary(max_size=60),
    flag=st.booleans(),
    contacts=st.lists(st.builds(_Contact, node_id=ids, address=addresses), max_size=5),
    pair=st.tuples(st.integers(), st.text(max_size=5)),
    maybe=st.none() | st.integers(),
    attrs=st.dictionaries(st.text(max_size=8), st.integers(), max_size=4),
)


@given(samples)
def test_every_field_kind_survives_a_round_trip(msg):
    assert decode(encode(msg), limit_bytes=wire.STREAM_LIMIT_BYTES) == msg


@given(nonce=st.integers(min_value=0, max_value=2**63 - 1), sender=ids, payload=st.binary(max_size=1000))
def test_ping_and_pong_round_trip(nonce, sender, payload):
    for cls in (Ping, Pong):
        msg = cls(nonce, sender, payload)
        assert decode(encode(msg)) == msg


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_and_never_decode_to_garbage(data):
    result = decode(data)
    if isinstance(result, DecodeError):
        assert result.kind in wire.DECODE_ERROR_KINDS
    else:  # random bytes that happen to be a valid message must re-encode to a message
        assert decode(encode(result)) == result


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.binary() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)))
def test_random_cbor_values_are_rejected_with_a_kind(value):
    result = decode(cbor2.dumps(value), limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert isinstance(result, DecodeError)


def test_oversized_datagram_is_rejected_before_parsing():
    big = encode(Ping(1, 1, b"x" * 2000))
    assert decode(big) == DecodeError("oversized", f"{len(big)} bytes, limit {DATAGRAM_LIMIT_BYTES}")
    assert decode(big, limit_bytes=wire.STREAM_LIMIT_BYTES) == Ping(1, 1, b"x" * 2000)


def test_unknown_tag_and_bad_version_are_named():
    assert decode(cbor2.dumps([wire.VERSION, 59999, []])).kind == "unknown_type"
    assert decode(cbor2.dumps([wire.VERSION + 1, 1, [1, bytes(20), b""]])).kind == "bad_version"


@pytest.mark.parametrize(
    "fields",
    [
        [1, bytes(19), b""],  # an id of the wrong size
        ["1", bytes(20), b""],  # a string where an int is expected
        [True, bytes(20), b""],  # a bool is not an int
        [1, bytes(20)],  # a field missing
        [1, bytes(20), b"", b""],  # a field too many
        [1, bytes(20), "text"],  # text where bytes are expected
    ],
)
def test_fields_that_break_the_schema_are_malformed(fields):
    result = decode(cbor2.dumps([wire.VERSION, wire.tag_of(Ping), fields]))
    assert isinstance(result, DecodeError) and result.kind == "malformed"


def test_encoding_an_invalid_message_is_local_misuse():
    with pytest.raises(WireError, match="field sender"):
        encode(Ping(1, 1 << 160, b""))
    with pytest.raises(WireError, match="not a registered message"):
        encode(_Contact(1, 2))
    with pytest.raises(WireError, match="over the limit"):
        encode(Ping(1, 1, b"x" * 100), limit_bytes=50)


def test_a_tag_cannot_name_two_messages():
    class Other:
        x: int

    with pytest.raises(WireError, match="already used"):
        wire.message(wire.tag_of(Ping))(Other)


def test_a_message_is_a_frozen_slotted_dataclass_made_once():
    assert dataclasses.is_dataclass(_Sample) and "__slots__" in vars(_Sample)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(1, 1, b"").nonce = 2  # type: ignore[misc]

    @dataclass(frozen=True, slots=True)
    class Twice:
        x: int

    with pytest.raises(WireError, match="drop its own @dataclass"):
        wire.message(60002)(Twice)
    assert 60002 not in wire.message_types()

    @wire.record(order=True)
    class Ranked:
        x: int

    assert Ranked(1) < Ranked(2)


def _sample_fields(**changes):
    fields = {"key": bytes(20), "count": 1, "ratio": 0.5, "name": "n", "blob": b"", "flag": False,
              "contacts": [[bytes(20), ["h", 1]]], "pair": [1, "a"], "maybe": None, "attrs": {"a": 1}}
    fields.update(changes)
    return list(fields.values())


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"key": bytes(19)}, "field key: expected a 20-byte id"),
        ({"ratio": "0.5"}, "field ratio: expected a number"),
        ({"flag": 0}, "field flag: expected bool"),
        ({"contacts": {}}, "field contacts: expected an array"),
        ({"contacts": [[bytes(20)]]}, "field contacts: expected 2 fields"),
        ({"contacts": [[bytes(20), ["h", "1"]]]},
         "field contacts: field address: matches none of typing.Union[tuple[str, int], int]"),
        ({"pair": [1]}, "field pair: expected 2 items"),
        ({"pair": [1, 2]}, "field pair: expected str"),
        ({"maybe": "x"}, "field maybe: matches none of int | None"),
        ({"attrs": {"a": "1"}}, "field attrs: expected int"),
        ({"attrs": []}, "field attrs: expected a map"),
    ],
)
def test_a_decode_error_names_the_field_and_what_it_expected(changes, detail):
    result = decode(cbor2.dumps([wire.VERSION, wire.tag_of(_Sample), _sample_fields(**changes)]),
                    limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert result == DecodeError("malformed", f"_Sample: {detail}")


def test_an_encode_error_names_the_nested_field():
    valid = decode(cbor2.dumps([wire.VERSION, wire.tag_of(_Sample), _sample_fields()]),
                   limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert isinstance(valid, _Sample)
    bad = [_Contact(1, ("h", 1)), _Contact(-1, 2)]
    with pytest.raises(WireError, match=r"^_Sample: field contacts: field node_id: expected a 160-bit id$"):
        encode(dataclasses.replace(valid, contacts=bad))
    with pytest.raises(WireError, match=r"^_Sample: field contacts: expected _Contact$"):
        encode(dataclasses.replace(valid, contacts=[("h", 1)]))


def _as_cbor2_fields(msg: _Sample) -> list:
    """The fields of ``msg`` in the plain form cbor2 would be handed (ids as bytes, tuples as arrays)."""
    def address(value):
        return list(value) if isinstance(value, tuple) else value

    return [msg.key.to_bytes(20, "big"), msg.count, msg.ratio, msg.name, msg.blob, msg.flag,
            [[c.node_id.to_bytes(20, "big"), address(c.address)] for c in msg.contacts],
            list(msg.pair), msg.maybe, msg.attrs]


@given(samples)
def test_the_encoding_is_cbor2s_encoding_of_the_fields(msg):
    assert encode(msg, limit_bytes=wire.STREAM_LIMIT_BYTES) == cbor2.dumps(
        [wire.VERSION, wire.tag_of(_Sample), _as_cbor2_fields(msg)])


@pytest.mark.parametrize("nonce", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, 2**200,
                                   -1, -24, -25, -256, -257, -(2**64), -(2**64) - 1, -(2**200)])
@pytest.mark.parametrize("payload_bytes", [0, 23, 24, 255, 256, 65535, 65536])
def test_ints_and_lengths_are_written_in_their_shortest_form_as_cbor2_writes_them(nonce, payload_bytes):
    msg = Ping(nonce, 1, b"x" * payload_bytes)
    encoded = encode(msg, limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert encoded == cbor2.dumps([wire.VERSION, wire.tag_of(Ping), [nonce, (1).to_bytes(20, "big"), msg.payload]])
    assert decode(encoded, limit_bytes=wire.STREAM_LIMIT_BYTES) == msg


def test_a_schema_error_is_reported_before_a_value_cbor2_cannot_write():
    valid = decode(cbor2.dumps([wire.VERSION, wire.tag_of(_Sample), _sample_fields()]),
                   limit_bytes=wire.STREAM_LIMIT_BYTES)
    with pytest.raises(WireError, match="field flag: expected bool"):
        encode(dataclasses.replace(valid, name="\udc80", flag=1))
    with pytest.raises(UnicodeEncodeError):  # not a schema error: cbor2's own, as before
        encode(dataclasses.replace(valid, name="\udc80"))


def test_a_record_sent_again_is_written_as_it_is_now():
    valid = decode(cbor2.dumps([wire.VERSION, wire.tag_of(_Sample), _sample_fields()]),
                   limit_bytes=wire.STREAM_LIMIT_BYTES)
    kept, changing = _Contact(7, ("h", 1)), _Contact(8, ["h", 1])  # the second holds a list
    msg = dataclasses.replace(valid, contacts=[kept, changing])
    assert encode(msg) == encode(msg) == cbor2.dumps([wire.VERSION, wire.tag_of(_Sample), _as_cbor2_fields(msg)])
    changing.address[1] = 2
    assert decode(encode(msg)).contacts == [kept, _Contact(8, ("h", 2))]
    for _ in range(wire.MEMO_ENTRIES + 1):  # a full memo starts afresh
        encode(dataclasses.replace(valid, contacts=[_Contact(9, ("h", 1))]))
    assert decode(encode(msg)).contacts == [kept, _Contact(8, ("h", 2))]
