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
        _fields_of(cls)
        return cls

    return register


def record(cls: type) -> type:
    """Register a frozen dataclass that travels nested inside messages (no tag of its own)."""
    if not dataclasses.is_dataclass(cls):
        raise WireError(f"{cls.__name__} must be a dataclass to be a record")
    _fields_of(cls)
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


# -- encoding -------------------------------------------------------------------------------


def encode(msg: Any, limit_bytes: int = STREAM_LIMIT_BYTES) -> bytes:
    """Encode a registered message; raise :class:`WireError` if it is invalid or too large."""
    cls = type(msg)
    tag = _TAG_OF.get(cls)
    if tag is None:
        raise WireError(f"{cls.__name__} is not a registered message")
    data = cbor2.dumps([VERSION, tag, _to_wire_fields(msg)])
    if len(data) > limit_bytes:
        raise WireError(f"{cls.__name__} encodes to {len(data)} bytes, over the limit of {limit_bytes}")
    return data


def _to_wire_fields(obj: Any) -> list[Any]:
    return [_to_wire(getattr(obj, name), hint, name) for name, hint in _fields_of(type(obj))]


def _to_wire(value: Any, hint: Any, name: str) -> Any:
    problem = _check(value, hint)
    if problem is not None:
        raise WireError(f"field {name}: {problem}")
    return _convert_out(value, hint)


def _convert_out(value: Any, hint: Any) -> Any:
    if hint is NodeId:
        return value.to_bytes(ID_BYTES, "big")
    if dataclasses.is_dataclass(hint):
        return _to_wire_fields(value)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return [_convert_out(v, a) for v, a in zip(value, args, strict=True)]
        return [_convert_out(v, args[0]) for v in value]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return {_convert_out(k, key_hint): _convert_out(v, value_hint) for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            if _check(value, arg) is None:
                return _convert_out(value, arg)
    return value


# -- decoding -------------------------------------------------------------------------------


def decode(data: bytes, limit_bytes: int = DATAGRAM_LIMIT_BYTES) -> Any:
    """Decode one message, or return a :class:`DecodeError`; never raises on bad input."""
    if len(data) > limit_bytes:
        return DecodeError("oversized", f"{len(data)} bytes, limit {limit_bytes}")
    try:
        raw = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many kinds on hostile input; all mean "malformed"
        return DecodeError("malformed", f"not CBOR: {type(exc).__name__}")
    if not (isinstance(raw, list) and len(raw) == 3):
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
        return _from_wire_fields(cls, fields)
    except _Invalid as exc:
        return DecodeError("malformed", f"{cls.__name__}: {exc}")


class _Invalid(Exception):
    pass


def _from_wire_fields(cls: type, fields: Any) -> Any:
    spec = _fields_of(cls)
    if not isinstance(fields, list) or len(fields) != len(spec):
        raise _Invalid(f"expected {len(spec)} fields")
    values = {}
    for (name, hint), raw in zip(spec, fields, strict=True):
        try:
            values[name] = _convert_in(raw, hint)
        except _Invalid as exc:
            raise _Invalid(f"field {name}: {exc}") from None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # a constructor's own validation
        raise _Invalid(str(exc)) from None


def _convert_in(raw: Any, hint: Any) -> Any:
    if hint is NodeId:
        if type(raw) is not bytes or len(raw) != ID_BYTES:
            raise _Invalid(f"expected a {ID_BYTES}-byte id")
        return int.from_bytes(raw, "big")
    if dataclasses.is_dataclass(hint):
        return _from_wire_fields(hint, raw)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if type(raw) is not list:
            raise _Invalid("expected an array")
        args = typing.get_args(hint)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(raw) != len(args):
                raise _Invalid(f"expected {len(args)} items")
            return tuple(_convert_in(v, a) for v, a in zip(raw, args, strict=True))
        items = [_convert_in(v, args[0]) for v in raw]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if type(raw) is not dict:
            raise _Invalid("expected a map")
        key_hint, value_hint = typing.get_args(hint)
        return {_convert_in(k, key_hint): _convert_in(v, value_hint) for k, v in raw.items()}
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _convert_in(raw, arg)
            except _Invalid:
                continue
        raise _Invalid(f"matches none of {hint}")
    problem = _check(raw, hint)
    if problem is not None:
        raise _Invalid(problem)
    return float(raw) if hint is float else raw


def _check(value: Any, hint: Any) -> str | None:
    """Return why ``value`` does not fit ``hint`` (``None`` when it fits)."""
    if hint is Any:
        return None
    if hint is type(None) or hint is None:
        return None if value is None else "expected null"
    if hint is NodeId:
        if type(value) is not int or not 0 <= value < 1 << ID_BITS:
            return f"expected a {ID_BITS}-bit id"
        return None
    if hint is float:
        return None if type(value) in (float, int) else "expected a number"
    if hint in (int, str, bytes, bool):
        return None if type(value) is hint else f"expected {hint.__name__}"
    if dataclasses.is_dataclass(hint):
        return None if type(value) is hint else f"expected {hint.__name__}"
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return "expected a sequence"
        args = typing.get_args(hint)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return f"expected {len(args)} items"
            pairs = zip(value, args, strict=True)
        else:
            pairs = ((v, args[0]) for v in value)
        for item, item_hint in pairs:
            problem = _check(item, item_hint)
            if problem is not None:
                return problem
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return "expected a map"
        key_hint, value_hint = typing.get_args(hint)
        for k, v in value.items():
            problem = _check(k, key_hint) or _check(v, value_hint)
            if problem is not None:
                return problem
        return None
    if origin in (Union, types.UnionType):
        if any(_check(value, arg) is None for arg in typing.get_args(hint)):
            return None
        return f"matches none of {hint}"
    raise WireError(f"unsupported field type {hint!r}")

