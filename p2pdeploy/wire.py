"""The wire format: CBOR messages with a protocol version, a type tag and schema checks.

Every message is a frozen dataclass registered here with a numeric tag (``@message(tag)``).
On the wire a message is the CBOR array ``[VERSION, tag, [field, ...]]``; nested records
(``@record`` dataclasses such as a contact) are plain arrays of their fields. Field types come
from the dataclass annotations and are checked on decode, so a peer cannot hand the core a
string where it expects an id.

This is the only module that knows CBOR. Decoding never raises past the boundary: a bad
input returns a :class:`DecodeError` whose ``kind`` the driver counts (``malformed``,
``oversized``, ``unknown_type``, ``bad_version``). Encoding a message that breaks its own
schema is local misuse and raises :class:`WireError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NewType, Union

import cbor2

VERSION = 1
#: Largest message that travels as one UDP datagram.
DATAGRAM_LIMIT_BYTES = 1200
#: Default bound for a message sent over a stream (bulk transfers).
STREAM_LIMIT_BYTES = 8 * 1024 * 1024

#: A 160-bit node or key identifier; 20 big-endian bytes on the wire.
NodeId = NewType("NodeId", int)
ID_BITS = 160
ID_BYTES = ID_BITS // 8

#: How a peer is reached: ``(host, port)`` on a real network, a node index in the simulator.
Address = Union[tuple[str, int], int]  # noqa: UP007 - a runtime type for the schema checker

DECODE_ERROR_KINDS = ("malformed", "oversized", "unknown_type", "bad_version")


class WireError(Exception):
    """Local misuse of the codec: encoding something that is not a valid message."""


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why a received payload was dropped. ``kind`` is one of ``DECODE_ERROR_KINDS``."""

    kind: str
    detail: str


_BY_TAG: dict[int, type] = {}
_TAG_OF: dict[type, int] = {}
_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def message(tag: int):
    """Register a frozen dataclass as a wire message with a unique numeric tag."""

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise WireError(f"{cls.__name__} must be a dataclass to be a message")
        if tag in _BY_TAG and _BY_TAG[tag] is not cls:
            raise WireError(f"tag {tag} is already used by {_BY_TAG[tag].__name__}")
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = tag
        _plan(cls)  # resolve the field types now: an unsupported one fails at import
        return cls

    return register


def record(cls: type) -> type:
    """Register a frozen dataclass that travels nested inside messages (no tag of its own)."""
    if not dataclasses.is_dataclass(cls):
        raise WireError(f"{cls.__name__} must be a dataclass to be a record")
    _plan(cls)
    return cls


def _fields_of(cls: type) -> tuple[tuple[str, Any], ...]:
    fields = _FIELDS.get(cls)
    if fields is None:
        hints = typing.get_type_hints(cls, globalns=_hint_namespace(cls))
        fields = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        _FIELDS[cls] = fields
    return fields


def _hint_namespace(cls: type) -> dict[str, Any]:
    import sys

    namespace = dict(vars(sys.modules[cls.__module__]))
    namespace.update({"NodeId": NodeId, "Address": Address})
    return namespace


def tag_of(cls: type) -> int:
    return _TAG_OF[cls]


def message_types() -> dict[int, type]:
    """The registered message classes by tag (a copy)."""
    return dict(_BY_TAG)


# -- compiled converters ---------------------------------------------------------------------
# Each field type is turned once into a pair of functions: ``out`` checks a local value and
# converts it to its CBOR form, ``in_`` checks a decoded CBOR value and converts it back. Both
# raise _Invalid with a short reason; the message-level functions name the field.


class _Invalid(Exception):
    pass


Converter = Callable[[Any], Any]
_OUT: dict[Any, Converter] = {}
_IN: dict[Any, Converter] = {}


def _converters(hint: Any) -> tuple[Converter, Converter]:
    out = _OUT.get(hint)
    if out is None:
        out, in_ = _compile(hint)
        _OUT[hint], _IN[hint] = out, in_
    return out, _IN[hint]


def _lazy(hint: Any) -> tuple[Converter, Converter]:
    """Converters for a nested type, compiled at first use (records may refer to each other)
    and kept from then on, so a message's nested fields cost no look-up per value."""
    resolved: list[Converter] = []

    def resolve() -> list[Converter]:
        resolved.extend(_converters(hint))
        return resolved

    def out(value: Any) -> Any:
        return (resolved or resolve())[0](value)

    def in_(raw: Any) -> Any:
        return (resolved or resolve())[1](raw)

    return out, in_


def _compile(hint: Any) -> tuple[Converter, Converter]:
    if hint is Any:
        return _identity, _identity
    if hint is type(None) or hint is None:
        return _none, _none
    if hint is NodeId:
        return _node_id_out, _node_id_in
    if hint is float:
        return _float_out, _float_in
    if hint in (int, str, bytes, bool):
        return _exact(hint), _exact(hint)
    if dataclasses.is_dataclass(hint):
        return _record_out(hint), _record_in(hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (list, tuple) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        return _sequence(hint, args[0], origin is tuple)
    if origin is tuple:
        return _fixed_tuple(args)
    if origin is dict:
        return _mapping(args[0], args[1])
    if origin in (Union, types.UnionType):
        return _union(hint, args)
    raise WireError(f"unsupported field type {hint!r}")


def _identity(value: Any) -> Any:
    return value


def _none(value: Any) -> None:
    if value is not None:
        raise _Invalid("expected null")
    return None


def _node_id_out(value: Any) -> bytes:
    if type(value) is not int or not 0 <= value < _ID_LIMIT:
        raise _Invalid(f"expected a {ID_BITS}-bit id")
    return value.to_bytes(ID_BYTES, "big")


def _node_id_in(raw: Any) -> int:
    if type(raw) is not bytes or len(raw) != ID_BYTES:
        raise _Invalid(f"expected a {ID_BYTES}-byte id")
    return int.from_bytes(raw, "big")


def _float_out(value: Any) -> Any:
    if type(value) is not float and type(value) is not int:
        raise _Invalid("expected a number")
    return value


def _float_in(raw: Any) -> float:
    if type(raw) is not float and type(raw) is not int:
        raise _Invalid("expected a number")
    return float(raw)


def _exact(kind: type) -> Converter:
    problem = f"expected {kind.__name__}"

    def convert(value: Any) -> Any:
        if type(value) is not kind:
            raise _Invalid(problem)
        return value

    return convert


def _record_out(cls: type) -> Converter:
    def out(value: Any) -> list[Any]:
        if type(value) is not cls:
            raise _Invalid(f"expected {cls.__name__}")
        return _fields_out(cls, value)

    return out


def _record_in(cls: type) -> Converter:
    def in_(raw: Any) -> Any:
        return _fields_in(cls, raw)

    return in_


def _sequence(hint: Any, item_hint: Any, as_tuple: bool) -> tuple[Converter, Converter]:
    item_out, item_in = _lazy(item_hint)

    def out(value: Any) -> list[Any]:
        if type(value) is not list and type(value) is not tuple:
            raise _Invalid("expected a sequence")
        return [item_out(item) for item in value]

    def in_(raw: Any) -> Any:
        if type(raw) is not list:
            raise _Invalid("expected an array")
        items = [item_in(item) for item in raw]
        return tuple(items) if as_tuple else items

    return out, in_


def _fixed_tuple(args: tuple[Any, ...]) -> tuple[Converter, Converter]:
    pairs = [_lazy(arg) for arg in args]
    count = len(args)

    def out(value: Any) -> list[Any]:
        if type(value) is not list and type(value) is not tuple:
            raise _Invalid("expected a sequence")
        if len(value) != count:
            raise _Invalid(f"expected {count} items")
        return [pair[0](item) for pair, item in zip(pairs, value, strict=True)]

    def in_(raw: Any) -> tuple[Any, ...]:
        if type(raw) is not list:
            raise _Invalid("expected an array")
        if len(raw) != count:
            raise _Invalid(f"expected {count} items")
        return tuple(pair[1](item) for pair, item in zip(pairs, raw, strict=True))

    return out, in_


def _mapping(key_hint: Any, value_hint: Any) -> tuple[Converter, Converter]:
    key_out, key_in = _lazy(key_hint)
    value_out, value_in = _lazy(value_hint)

    def out(value: Any) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise _Invalid("expected a map")
        return {key_out(k): value_out(v) for k, v in value.items()}

    def in_(raw: Any) -> dict[Any, Any]:
        if type(raw) is not dict:
            raise _Invalid("expected a map")
        return {key_in(k): value_in(v) for k, v in raw.items()}

    return out, in_


def _union(hint: Any, args: tuple[Any, ...]) -> tuple[Converter, Converter]:
    alternatives = [_lazy(arg) for arg in args]
    problem = f"matches none of {hint}"

    def first_that_fits(direction: int) -> Converter:
        """The converter trying each alternative's (out: 0, in: 1) converter in turn."""

        def convert(value: Any) -> Any:
            for pair in alternatives:
                try:
                    return pair[direction](value)
                except _Invalid:
                    continue
            raise _Invalid(problem)

        return convert

    return first_that_fits(0), first_that_fits(1)


_ID_LIMIT = 1 << ID_BITS
_PLANS: dict[type, tuple[tuple[str, Converter, Converter], ...]] = {}


def _plan(cls: type) -> tuple[tuple[str, Converter, Converter], ...]:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = tuple((name, *_converters(hint)) for name, hint in _fields_of(cls))
    return plan


def _fields_out(cls: type, obj: Any) -> list[Any]:
    out = []
    for name, convert, _ in _plan(cls):
        try:
            out.append(convert(getattr(obj, name)))
        except _Invalid as exc:
            raise _Invalid(f"field {name}: {exc}") from None
    return out


def _fields_in(cls: type, raw: Any) -> Any:
    plan = _plan(cls)
    if type(raw) is not list or len(raw) != len(plan):
        raise _Invalid(f"expected {len(plan)} fields")
    values = []
    for (name, _, convert), item in zip(plan, raw, strict=True):
        try:
            values.append(convert(item))
        except _Invalid as exc:
            raise _Invalid(f"field {name}: {exc}") from None
    try:
        return cls(*values)
    except (TypeError, ValueError) as exc:  # a constructor's own validation
        raise _Invalid(str(exc)) from None


# -- encoding -------------------------------------------------------------------------------


def encode(msg: Any, limit_bytes: int = STREAM_LIMIT_BYTES) -> bytes:
    """Encode a registered message; raise :class:`WireError` if it is invalid or too large."""
    cls = type(msg)
    tag = _TAG_OF.get(cls)
    if tag is None:
        raise WireError(f"{cls.__name__} is not a registered message")
    try:
        fields = _fields_out(cls, msg)
    except _Invalid as exc:
        raise WireError(f"{cls.__name__}: {exc}") from None
    data = cbor2.dumps([VERSION, tag, fields])
    if len(data) > limit_bytes:
        raise WireError(f"{cls.__name__} encodes to {len(data)} bytes, over the limit of {limit_bytes}")
    return data


# -- decoding -------------------------------------------------------------------------------


def decode(data: bytes, limit_bytes: int = DATAGRAM_LIMIT_BYTES) -> Any:
    """Decode one message, or return a :class:`DecodeError`; never raises on bad input."""
    if len(data) > limit_bytes:
        return DecodeError("oversized", f"{len(data)} bytes, limit {limit_bytes}")
    try:
        raw = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many kinds on hostile input; all mean "malformed"
        return DecodeError("malformed", f"not CBOR: {type(exc).__name__}")
    if not (type(raw) is list and len(raw) == 3):
        return DecodeError("malformed", "envelope must be [version, tag, fields]")
    version, tag, fields = raw
    if type(version) is not int:
        return DecodeError("malformed", "version must be an integer")
    if version != VERSION:
        return DecodeError("bad_version", f"version {version}, this node speaks {VERSION}")
    if type(tag) is not int:
        return DecodeError("malformed", "tag must be an integer")
    cls = _BY_TAG.get(tag)
    if cls is None:
        return DecodeError("unknown_type", f"tag {tag}")
    try:
        return _fields_in(cls, fields)
    except _Invalid as exc:
        return DecodeError("malformed", f"{cls.__name__}: {exc}")
    except RecursionError:
        return DecodeError("malformed", f"{cls.__name__}: nested too deeply")
