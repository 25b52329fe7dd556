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
import operator
import struct
import types
import typing
from collections.abc import Callable
from contextvars import ContextVar
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
#: The encoded start of each message class's envelope, up to its fields.
_ENVELOPE_HEADS: dict[type, bytes] = {}
_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


@typing.dataclass_transform(frozen_default=True)
def message(tag: int, **options: Any) -> Callable[[type], type]:
    """Make a class a wire message: a frozen, slotted dataclass (``options`` add dataclass
    options such as ``order=True``) registered with a unique numeric tag."""

    def register(cls: type) -> type:
        if tag in _BY_TAG and _name(_BY_TAG[tag]) != _name(cls):
            raise WireError(f"tag {tag} is already used by {_BY_TAG[tag].__name__}")
        cls = _frozen(cls, options)
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = tag
        _ENVELOPE_HEADS[cls] = _cbor_head(_ARRAY, 3) + _cbor_int(VERSION) + _cbor_int(tag)  # [VERSION, tag, ...
        _converters(cls)  # resolve the field types now: an unsupported one fails at import
        return cls

    return register


@typing.dataclass_transform(frozen_default=True)
def record(cls: type | None = None, /, **options: Any) -> Any:
    """Make a class a record that travels nested inside messages (no tag of its own): a frozen,
    slotted dataclass, as a message. ``@record`` or ``@record(order=True)``."""

    def register(cls: type) -> type:
        cls = _frozen(cls, options)
        _converters(cls)
        return cls

    return register if cls is None else register(cls)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _frozen(cls: type, options: dict[str, Any]) -> type:
    if "__dataclass_fields__" in vars(cls):
        raise WireError(f"{cls.__name__}: @message and @record make the dataclass; drop its own @dataclass")
    return dataclass(frozen=True, slots=True, **options)(cls)


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


# -- generated converters --------------------------------------------------------------------
# Each record or message class gets a pair of functions, written once as straight-line Python
# (as ``dataclasses`` writes ``__init__``): ``out`` checks an instance and returns its CBOR
# encoding, ``in_`` checks a decoded CBOR value and builds the instance. The checks of nested
# field types (ids, numbers, sequences, tuples, maps, unions) are written inline; a nested
# record is a call to its own pair. Both raise _Invalid with a short reason naming the field.
# Field types are resolved when a class registers, so a record is complete before any class
# that contains it.
#
# ``out`` writes the bytes itself (ids, ints, strings, byte strings, arrays and maps, the way
# cbor2 writes them: shortest heads, maps in insertion order) and leaves cbor2 the values it
# has no rule for (floats, ints beyond 64 bits, untyped fields): CBOR items concatenate, so
# the result is the bytes ``cbor2.dumps`` gives for the same fields. A message is mostly
# small arrays, and cbor2 costs much more per array than a few concatenations.


class _Invalid(Exception):
    pass


Converter = Callable[[Any], Any]
_ID_LIMIT = 1 << ID_BITS
_CONVERTERS: dict[type, tuple[Converter, Converter]] = {}

# CBOR major types, as the high bits of an item's first byte.
_UNSIGNED, _NEGATIVE, _BYTES, _TEXT, _ARRAY, _MAP = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
_SHORT_HEADS = {major: [bytes((major | n,)) for n in range(24)]
                for major in (_UNSIGNED, _NEGATIVE, _BYTES, _TEXT, _ARRAY, _MAP)}
_UINT64_LIMIT = 1 << 64
_SHORT_UNSIGNED = _SHORT_HEADS[_UNSIGNED]
#: A head with a 1, 2, 4 or 8-byte argument after the first byte.
_HEAD_1, _HEAD_2, _HEAD_4, _HEAD_8 = (struct.Struct(f">B{size}").pack for size in "BHIQ")


def _cbor_head(major: int, n: int) -> bytes:
    """The head of an item of ``major`` type with argument ``n`` (0 <= n < 2**64), shortest form."""
    if n < 24:
        return _SHORT_HEADS[major][n]
    if n < 0x100:
        return _HEAD_1(major | 24, n)
    if n < 0x10000:
        return _HEAD_2(major | 25, n)
    if n < 0x100000000:
        return _HEAD_4(major | 26, n)
    return _HEAD_8(major | 27, n)


def _cbor_int(value: int) -> bytes:
    if value >= 0:
        if value < 0x10000:  # most ints on the wire (ports, counts) without another call
            return _SHORT_UNSIGNED[value] if value < 24 else (
                _HEAD_1(_UNSIGNED | 24, value) if value < 0x100 else _HEAD_2(_UNSIGNED | 25, value))
        if value < _UINT64_LIMIT:
            return _cbor_head(_UNSIGNED, value)
    elif value >= -_UINT64_LIMIT:
        return _cbor_head(_NEGATIVE, -1 - value)
    return cbor2.dumps(value)  # a bignum (a tagged byte string)


def _cbor_text(value: str) -> bytes:
    try:
        data = value.encode()
    except UnicodeEncodeError:  # a lone surrogate: cbor2 refuses it the same way
        if _checking_only.get():
            return b""
        raise
    return _cbor_head(_TEXT, len(data)) + data


def _cbor_any(value: Any) -> bytes:
    """An untyped value or a float, as cbor2 writes it."""
    try:
        return cbor2.dumps(value)
    except Exception:
        if _checking_only.get():
            return b""
        raise


#: Set while a message whose values cbor2 cannot all write is checked whole (see ``encode``).
_checking_only: ContextVar[bool] = ContextVar("_checking_only", default=False)


def _cbor_bytes(value: bytes) -> bytes:
    return _cbor_head(_BYTES, len(value)) + value


def _converters(cls: type) -> tuple[Converter, Converter]:
    pair = _CONVERTERS.get(cls)
    if pair is None:
        pair = _CONVERTERS[cls] = (_record_out(cls), _record_in(cls))
    return pair


class _Source:
    """The text of one generated function and the objects its code names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, Any] = {
            "_Invalid": _Invalid, "_ID_LIMIT": _ID_LIMIT, "_cbor_any": _cbor_any, "_cbor_head": _cbor_head,
            "_cbor_int": _cbor_int, "_cbor_text": _cbor_text, "_cbor_bytes": _cbor_bytes,
        }
        self._count = 0

    def fresh(self, stem: str) -> str:
        """A new variable name (every name ends in a number of its own, so none shadows another)."""
        self._count += 1
        return f"{stem}{self._count}"

    def constant(self, value: Any) -> str:
        name = self.fresh("c")
        self.names[name] = value
        return name

    def add(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def assign(self, indent: int, expression: str) -> str:
        """A new variable set to ``expression``; its name."""
        name = self.fresh("v")
        self.add(indent, f"{name} = {expression}")
        return name

    def reject(self, indent: int, condition: str, reason: str) -> None:
        self.add(indent, f"if {condition}:")
        self.add(indent + 1, f"raise _Invalid({reason!r})")

    def function(self, name: str, parameter: str) -> Converter:
        exec(f"def {name}({parameter}):\n" + "\n".join(self.lines), self.names)
        function: Converter = self.names[name]
        return function


def _emit(hint: Any, value: str, outward: bool, source: _Source, indent: int) -> str:
    """Write the lines that check the variable ``value`` against ``hint`` and convert it (to its
    CBOR encoding when ``outward``, back from its decoded CBOR value otherwise); the name of
    the result's variable."""
    if hint is Any:
        return source.assign(indent, f"_cbor_any({value})") if outward else value
    if hint is type(None) or hint is None:
        source.reject(indent, f"{value} is not None", "expected null")
        return source.constant(cbor2.dumps(None)) if outward else value
    if hint is NodeId:
        if outward:
            source.reject(indent, f"type({value}) is not int or not 0 <= {value} < _ID_LIMIT",
                          f"expected a {ID_BITS}-bit id")
            head = source.constant(_cbor_head(_BYTES, ID_BYTES))
            return source.assign(indent, f"{head} + {value}.to_bytes({ID_BYTES}, 'big')")
        source.reject(indent, f"type({value}) is not bytes or len({value}) != {ID_BYTES}",
                      f"expected a {ID_BYTES}-byte id")
        return source.assign(indent, f"int.from_bytes({value}, 'big')")
    if hint is float:
        source.reject(indent, f"type({value}) is not float and type({value}) is not int", "expected a number")
        return source.assign(indent, f"_cbor_any({value})" if outward else f"float({value})")
    if hint in (int, str, bytes, bool):
        source.reject(indent, f"type({value}) is not {hint.__name__}", f"expected {hint.__name__}")
        if not outward:
            return value
        if hint is bool:
            true, false = source.constant(cbor2.dumps(True)), source.constant(cbor2.dumps(False))
            return source.assign(indent, f"{true} if {value} else {false}")
        write = {int: "_cbor_int", str: "_cbor_text", bytes: "_cbor_bytes"}[hint]
        return source.assign(indent, f"{write}({value})")
    if dataclasses.is_dataclass(hint):
        convert = source.constant(_converters(hint)[0 if outward else 1])
        return source.assign(indent, f"{convert}({value})")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (list, tuple) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        return _emit_sequence(args[0], origin is tuple, value, outward, source, indent)
    if origin is tuple:
        return _emit_fixed_tuple(args, value, outward, source, indent)
    if origin is dict:
        return _emit_mapping(args[0], args[1], value, outward, source, indent)
    if origin in (Union, types.UnionType):
        return _emit_union(hint, args, value, outward, source, indent)
    raise WireError(f"unsupported field type {hint!r}")


def _reject_non_array(value: str, outward: bool, source: _Source, indent: int) -> None:
    if outward:
        source.reject(indent, f"type({value}) is not list and type({value}) is not tuple", "expected a sequence")
    else:
        source.reject(indent, f"type({value}) is not list", "expected an array")


def _emit_sequence(item_hint: Any, as_tuple: bool, value: str, outward: bool, source: _Source, indent: int) -> str:
    _reject_non_array(value, outward, source, indent)
    if dataclasses.is_dataclass(item_hint):  # the common case (contacts): one call per item
        write, read = _converters(item_hint)
        if outward and item_hint.__dataclass_params__.frozen:
            write = _memoized(write, [name for name, _ in _fields_of(item_hint)])
        convert = source.constant(write if outward else read)
        items = source.assign(indent, f"[{convert}(item) for item in {value}]")
    else:
        items, item = source.fresh("v"), source.fresh("i")
        source.add(indent, f"{items} = []")
        source.add(indent, f"for {item} in {value}:")
        source.add(indent + 1, f"{items}.append({_emit(item_hint, item, outward, source, indent + 1)})")
    if outward:
        return source.assign(indent, f"_cbor_head({_ARRAY}, len({items})) + b''.join({items})")
    return source.assign(indent, f"tuple({items})") if as_tuple else items


def _emit_fixed_tuple(args: tuple[Any, ...], value: str, outward: bool, source: _Source, indent: int) -> str:
    _reject_non_array(value, outward, source, indent)
    source.reject(indent, f"len({value}) != {len(args)}", f"expected {len(args)} items")
    converted = []
    for index, arg in enumerate(args):
        item = source.assign(indent, f"{value}[{index}]")
        converted.append(_emit(arg, item, outward, source, indent))
    if outward:
        return source.assign(indent, " + ".join([source.constant(_cbor_head(_ARRAY, len(args))), *converted]))
    return source.assign(indent, f"({', '.join(converted)}{',' if len(args) == 1 else ''})")


def _emit_mapping(key_hint: Any, value_hint: Any, value: str, outward: bool, source: _Source, indent: int) -> str:
    if outward:
        source.reject(indent, f"not isinstance({value}, dict)", "expected a map")
    else:
        source.reject(indent, f"type({value}) is not dict", "expected a map")
    result, key, item = source.fresh("v"), source.fresh("k"), source.fresh("i")
    source.add(indent, f"{result} = {'[]' if outward else '{}'}")
    source.add(indent, f"for {key}, {item} in {value}.items():")
    converted_key = _emit(key_hint, key, outward, source, indent + 1)
    converted_item = _emit(value_hint, item, outward, source, indent + 1)
    if not outward:
        source.add(indent + 1, f"{result}[{converted_key}] = {converted_item}")
        return result
    source.add(indent + 1, f"{result}.append({converted_key} + {converted_item})")
    return source.assign(indent, f"_cbor_head({_MAP}, len({result})) + b''.join({result})")


def _emit_union(hint: Any, args: tuple[Any, ...], value: str, outward: bool, source: _Source, indent: int) -> str:
    """The alternatives in order, each tried when the one before it failed."""
    result = source.fresh("v")
    for depth, arg in enumerate(args):
        source.add(indent + depth, "try:")
        source.add(indent + depth + 1, f"{result} = {_emit(arg, value, outward, source, indent + depth + 1)}")
        source.add(indent + depth, "except _Invalid:")
    source.add(indent + len(args), f"raise _Invalid({f'matches none of {hint}'!r}) from None")
    return result


#: How many encoded instances a memo keeps before it starts afresh.
MEMO_ENTRIES = 4096


def _memoized(write: Converter, names: list[str]) -> Converter:
    """``write`` for the items of a sequence of frozen records (fields ``names``), which recur:
    the contacts of a routing table go out in reply after reply. The bytes of an instance whose
    field values are all hashable (nothing in it can change) are kept with the instance, so no
    other object can have its id while they are; an instance that breaks its schema raises
    each time, as it is never kept."""
    memo: dict[int, tuple[Any, bytes]] = {}
    field_values = operator.attrgetter(*names) if names else (lambda value: ())

    def write_memoized(value: Any) -> bytes:
        kept = memo.get(id(value))
        if kept is not None and kept[0] is value:
            return kept[1]
        data: bytes = write(value)
        try:
            hash(field_values(value))
        except TypeError:  # a list or a map inside: it could change
            return data
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[id(value)] = (value, data)
        return data

    return write_memoized


def _record_out(cls: type) -> Converter:
    fields = _fields_of(cls)
    source = _Source()
    source.reject(1, f"type(value) is not {source.constant(cls)}", f"expected {cls.__name__}")
    converted = [source.constant(_cbor_head(_ARRAY, len(fields)))]
    for name, hint in fields:
        source.add(1, "try:")
        field_value = source.assign(2, f"value.{name}")
        converted.append(_emit(hint, field_value, True, source, 2))
        source.add(1, "except _Invalid as exc:")
        source.add(2, f"raise _Invalid({f'field {name}: '!r} + str(exc)) from None")
    source.add(1, f"return b''.join(({', '.join(converted)},))")
    return source.function(f"{cls.__name__}_out", "value")


def _record_in(cls: type) -> Converter:
    fields = _fields_of(cls)
    source = _Source()
    source.reject(1, f"type(raw) is not list or len(raw) != {len(fields)}", f"expected {len(fields)} fields")
    converted = []
    for index, (name, hint) in enumerate(fields):
        source.add(1, "try:")
        field_value = source.assign(2, f"raw[{index}]")
        converted.append(_emit(hint, field_value, False, source, 2))
        source.add(1, "except _Invalid as exc:")
        source.add(2, f"raise _Invalid({f'field {name}: '!r} + str(exc)) from None")
    source.add(1, "try:")
    source.add(2, f"return {source.constant(cls)}({', '.join(converted)})")
    source.add(1, "except (TypeError, ValueError) as exc:  # a constructor's own validation")
    source.add(2, "raise _Invalid(str(exc)) from None")
    return source.function(f"{cls.__name__}_in", "raw")


# -- encoding -------------------------------------------------------------------------------


def encode(msg: Any, limit_bytes: int = STREAM_LIMIT_BYTES) -> bytes:
    """Encode a registered message; raise :class:`WireError` if it is invalid or too large."""
    cls = type(msg)
    tag = _TAG_OF.get(cls)
    if tag is None:
        raise WireError(f"{cls.__name__} is not a registered message")
    write = _converters(cls)[0]
    try:
        fields = write(msg)
    except _Invalid as exc:
        raise WireError(f"{cls.__name__}: {exc}") from None
    except Exception:  # cbor2 cannot write a value; a schema error anywhere in the message comes first
        token = _checking_only.set(True)
        try:
            write(msg)
        except _Invalid as exc:
            raise WireError(f"{cls.__name__}: {exc}") from None
        finally:
            _checking_only.reset(token)
        raise
    data = _ENVELOPE_HEADS[cls] + fields
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
        return _converters(cls)[1](fields)
    except _Invalid as exc:
        return DecodeError("malformed", f"{cls.__name__}: {exc}")
    except RecursionError:
        return DecodeError("malformed", f"{cls.__name__}: nested too deeply")
