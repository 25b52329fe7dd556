r"""The requirements language: one small language for node characteristics and service needs.

A node describes itself as attributes (numbers, strings, sets of strings, booleans); a service
says what it needs as an expression over them::

    cpu_free >= 1 and memory_free >= 512M and os == "linux" and not owner == "mallory"
    arch in {"x86_64", "aarch64"} and "gpu" in tags

Grammar (precedence from loosest to tightest: ``or``, ``and``, ``not``, comparison)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in") operand]
    operand    := number | string | "true" | "false" | name | set | "(" expr ")"
    set        := "{" [literal ("," literal)* [","]] "}"
    number     := ["-"] digits ["." digits] [exponent] [unit]      (512M, 1.5G, 2GiB, 0.25)
    string     := '"' ... '"' | "'" ... "'"                       (\\ \" \' \n \t \r \uXXXX)
    name       := letter-or-_ (letter | digit | _ | .)*

Size units are those of :mod:`p2pdeploy.fabric.units` (``K``/``M``/``G``/``T`` and
``KiB``... are powers of 1024, ``KB``... of 1000). A comparison with an attribute the node
does not have, or between values of different kinds (a string and a number), is false;
order comparisons are for numbers only. So ``not owner == "x"`` holds on a node with no owner,
while ``owner != "x"`` does not.

:meth:`Requirement.evaluate` answers yes or no; :meth:`Requirement.explain` lists the clauses
that failed with the values that made them fail, which is what a deployer needs to read. The
same expressions serve as content filters elsewhere (anything that has attributes).
A hand-written tokenizer and recursive-descent parser; every syntax error is a
:class:`ParseError` naming the column, and nothing else escapes the parser.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.fabric.units import SIZE_UNITS, format_size

MAX_SOURCE_CHARS = 10_000
MAX_DEPTH = 64
KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
COMPARISONS = ("==", "!=", "<=", ">=", "<", ">", "in", "not in")


class ParseError(ValueError):
    """A requirement is not well formed; ``column`` is 1-based."""

    def __init__(self, message: str, column: int, found: str | None = None) -> None:
        text = f"requirement: {message} at column {column}"
        super().__init__(f"{text} (found {found})" if found else text)
        self.column = column


# -- the syntax tree ------------------------------------------------------------------------

Value = int | float | str | bool | frozenset


@dataclass(frozen=True, slots=True)
class Literal:
    value: Value
    #: How the source spelled it (``512M``), kept for messages; not part of equality.
    text: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Not:
    item: Node


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Node, ...]


Node = Literal | Attribute | Compare | Not | And | Or


# -- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number | string | name | keyword | op | end
    text: str
    column: int
    value: Any = None


_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?")
_UNIT_RE = re.compile(r"[A-Za-z]+")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "(", ")", "{", "}", ",", "-")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "/": "/", "b": "\b", "f": "\f"}


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(source)
    while i < n:
        ch = source[i]
        column = i + 1
        if ch in " \t\r\n":
            i += 1
            continue
        if ch.isascii() and (ch.isdigit() or (ch == "." and i + 1 < n and source[i + 1].isdigit())):
            match = _NUMBER_RE.match(source, i)
            assert match is not None
            text = match.group()
            i = match.end()
            number: int | float = float(text) if any(c in text for c in ".eE") else int(text)
            unit = _UNIT_RE.match(source, i)
            if unit is not None:
                factor = SIZE_UNITS.get(unit.group())
                if factor is None:
                    raise ParseError(f"unknown size unit {unit.group()!r} after {text}", unit.start() + 1)
                if isinstance(number, float) and not math.isfinite(number * factor):
                    raise ParseError(f"number {text}{unit.group()} is too large", column)
                number = int(number * factor)
                text += unit.group()
                i = unit.end()
            if isinstance(number, float) and not math.isfinite(number):
                raise ParseError(f"number {text} is too large", column)
            tokens.append(_Token("number", text, column, number))
        elif ch in "\"'":
            value, i = _read_string(source, i)
            tokens.append(_Token("string", source[column - 1 : i], column, value))
        elif ch.isascii() and (ch.isalpha() or ch == "_"):
            match = _NAME_RE.match(source, i)
            assert match is not None
            text = match.group()
            i = match.end()
            tokens.append(_Token("keyword" if text in KEYWORDS else "name", text, column))
        else:
            for op in _OPERATORS:
                if source.startswith(op, i):
                    tokens.append(_Token("op", op, column))
                    i += len(op)
                    break
            else:
                shown = ch if ch.isprintable() else repr(ch)
                raise ParseError(f"unexpected character {shown!r}" if ch.isprintable() else f"unexpected character {shown}", column)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _read_string(source: str, start: int) -> tuple[str, int]:
    quote = source[start]
    out: list[str] = []
    i = start + 1
    n = len(source)
    while i < n:
        ch = source[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            code = source[i + 1]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
                continue
            if code == "u":
                digits = source[i + 2 : i + 6]
                if len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
                    out.append(chr(int(digits, 16)))
                    i += 6
                    continue
                raise ParseError("expected 4 hex digits after \\u", i + 1)
            raise ParseError(f"unknown escape \\{code}", i + 1)
        out.append(ch)
        i += 1
    raise ParseError("unterminated string", start + 1)


# -- the parser -----------------------------------------------------------------------------


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.pos]

    def _is(self, kind: str, text: str | None = None) -> bool:
        token = self.token
        return token.kind == kind and (text is None or token.text == text)

    def _advance(self) -> _Token:
        token = self.token
        self.pos += 1
        return token

    def _describe(self, token: _Token) -> str:
        return "the end" if token.kind == "end" else repr(token.text)

    def parse(self) -> Node:
        if self._is("end"):
            raise ParseError("empty requirement", 1)
        node = self.expr()
        if not self._is("end"):
            token = self.token
            raise ParseError("expected 'and', 'or' or the end", token.column, self._describe(token))
        return node

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"nested more than {MAX_DEPTH} levels deep", self.token.column)

    def expr(self) -> Node:
        self._enter()
        items = [self.and_expr()]
        while self._is("keyword", "or"):
            self._advance()
            items.append(self.and_expr())
        self.depth -= 1
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.not_expr()]
        while self._is("keyword", "and"):
            self._advance()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Node:
        if self._is("keyword", "not"):
            self._advance()
            self._enter()
            item = self.not_expr()
            self.depth -= 1
            return Not(item)
        return self.comparison()

    def comparison(self) -> Node:
        left = self.operand(None)
        token = self.token
        op: str | None = None
        if token.kind == "op" and token.text in ("==", "!=", "<=", ">=", "<", ">"):
            op = token.text
            self._advance()
        elif self._is("keyword", "in"):
            op = "in"
            self._advance()
        elif self._is("keyword", "not") and self.tokens[self.pos + 1].kind == "keyword" and self.tokens[self.pos + 1].text == "in":
            op = "not in"
            self._advance()
            self._advance()
        if op is None:
            return left
        right = self.operand(op)
        return Compare(op, left, right)

    def operand(self, after: str | None) -> Node:
        token = self.token
        if token.kind == "number":
            self._advance()
            return Literal(token.value, token.text)
        if token.kind == "op" and token.text == "-":
            self._advance()
            number = self.token
            if number.kind != "number":
                raise ParseError("expected a number after '-'", number.column, self._describe(number))
            self._advance()
            return Literal(-number.value, "-" + number.text)
        if token.kind == "string":
            self._advance()
            return Literal(token.value)
        if token.kind == "keyword" and token.text in ("true", "false"):
            self._advance()
            return Literal(token.text == "true")
        if token.kind == "name":
            self._advance()
            return Attribute(token.text)
        if token.kind == "op" and token.text == "{":
            return self.set_literal()
        if token.kind == "op" and token.text == "(":
            self._advance()
            node = self.expr()
            if not self._is("op", ")"):
                raise ParseError(f"expected ')' to close the '(' at column {token.column}", self.token.column, self._describe(self.token))
            self._advance()
            return node
        if after is None and self.pos > 0:
            after = self.tokens[self.pos - 1].text
        what = f"after '{after}'" if after else "at the start"
        raise ParseError(f"expected a value {what}", token.column, self._describe(token))

    def set_literal(self) -> Node:
        opening = self._advance()
        items: list[Any] = []
        while not self._is("op", "}"):
            element = self.operand("{" if not items else ",")
            if not isinstance(element, Literal) or isinstance(element.value, frozenset):
                raise ParseError("a set holds numbers, strings or booleans", self.tokens[self.pos - 1].column)
            items.append(element.value)
            if self._is("op", ","):
                self._advance()
            elif not self._is("op", "}"):
                token = self.token
                raise ParseError(f"expected ',' or '}}' in the set opened at column {opening.column}", token.column, self._describe(token))
        self._advance()
        return Literal(frozenset(items))


def parse(source: str) -> Node:
    """The syntax tree of ``source``; raise :class:`ParseError` (and only that) when it is malformed."""
    if not isinstance(source, str):
        raise ParseError(f"expected text, not {type(source).__name__}", 1)
    if len(source) > MAX_SOURCE_CHARS:
        raise ParseError(f"longer than {MAX_SOURCE_CHARS} characters", MAX_SOURCE_CHARS + 1)
    return _Parser(_tokenize(source)).parse()


# -- printing -------------------------------------------------------------------------------

_PRECEDENCE = {Or: 1, And: 2, Not: 3, Compare: 4, Literal: 5, Attribute: 5}


def format_node(node: Node) -> str:
    """The canonical text of ``node``; ``parse(format_node(n)) == n``."""
    if isinstance(node, Literal):
        return node.text or _format_value(node.value)
    if isinstance(node, Attribute):
        return node.name
    if isinstance(node, Compare):
        return f"{_operand_text(node.left)} {node.op} {_operand_text(node.right)}"
    if isinstance(node, Not):
        inner = format_node(node.item)
        return f"not ({inner})" if isinstance(node.item, And | Or) else f"not {inner}"
    if isinstance(node, And | Or):
        word = " and " if isinstance(node, And) else " or "
        parts = []
        for item in node.items:
            text = format_node(item)
            # a nested and/or keeps its parentheses so the tree reads back the same shape
            parts.append(f"({text})" if isinstance(item, And | Or) else text)
        return word.join(parts)
    raise TypeError(f"not a requirement node: {node!r}")


def _operand_text(node: Node) -> str:
    text = format_node(node)
    return f"({text})" if isinstance(node, And | Or | Not | Compare) else text


def _format_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, frozenset):
        items = sorted(value, key=lambda v: (type(v).__name__, v))
        return "{" + ", ".join(_format_value(v) for v in items) + "}"
    raise TypeError(f"not a requirement value: {value!r}")


# -- evaluation -----------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, frozenset | set | list | tuple):
        return "set"
    return "other"


def _value(node: Node, attrs: Mapping[str, Any]) -> Any:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Attribute):
        return attrs.get(node.name, MISSING)
    return _evaluate(node, attrs)


def _compare(op: str, left: Any, right: Any) -> bool:
    if left is MISSING or right is MISSING:
        return False
    if op in ("in", "not in"):
        if _kind(right) != "set" or _kind(left) in ("set", "other"):
            return False
        try:
            inside = left in right
        except TypeError:
            return False
        return inside if op == "in" else not inside
    kind = _kind(left)
    if kind != _kind(right) or kind == "other":
        return False
    if kind == "set":
        left, right = frozenset(left), frozenset(right)
    if op == "==":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if kind != "number":
        return False
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def _evaluate(node: Node, attrs: Mapping[str, Any]) -> bool:
    if isinstance(node, And):
        return all(_evaluate(item, attrs) for item in node.items)
    if isinstance(node, Or):
        return any(_evaluate(item, attrs) for item in node.items)
    if isinstance(node, Not):
        return not _evaluate(node.item, attrs)
    if isinstance(node, Compare):
        return _compare(node.op, _value(node.left, attrs), _value(node.right, attrs))
    value = _value(node, attrs)
    return value is True  # a bare operand holds only when it is the boolean true


def _describe(node: Node, attrs: Mapping[str, Any]) -> list[str]:
    """What the attributes in ``node`` are on this node, for an explanation."""
    if isinstance(node, Attribute):
        value = attrs.get(node.name, MISSING)
        if value is MISSING:
            return [f"{node.name} is not known"]
        return [f"{node.name} is {_show(node.name, value)}"]
    if isinstance(node, Compare):
        return _describe(node.left, attrs) + _describe(node.right, attrs)
    if isinstance(node, Not):
        return _describe(node.item, attrs)
    if isinstance(node, And | Or):
        return [d for item in node.items for d in _describe(item, attrs)]
    return []


def _show(name: str, value: Any) -> str:
    if isinstance(value, frozenset | set | list | tuple):
        try:
            return _format_value(frozenset(value))
        except TypeError:
            return repr(value)
    if isinstance(value, bool | str) or not isinstance(value, int | float):
        return _format_value(value) if isinstance(value, bool | str) else repr(value)
    if ("memory" in name or "disk" in name or name.endswith("_bytes")) and abs(value) >= 1024:
        return format_size(value)
    return _format_value(value)


def _explain(node: Node, attrs: Mapping[str, Any]) -> list[str]:
    if _evaluate(node, attrs):
        return []
    if isinstance(node, And | Or):
        return [failure for item in node.items for failure in _explain(item, attrs)]
    facts = list(dict.fromkeys(_describe(node, attrs)))
    text = format_node(node)
    return [f"{text} ({', '.join(facts)})" if facts else text]


@dataclass(frozen=True, slots=True)
class Requirement:
    """A parsed requirement; ``str()`` gives its canonical text."""

    node: Node

    @classmethod
    def parse(cls, source: str) -> Requirement:
        return cls(parse(source))

    def evaluate(self, attrs: Mapping[str, Any]) -> bool:
        return _evaluate(self.node, attrs)

    def explain(self, attrs: Mapping[str, Any]) -> list[str]:
        """The clauses that fail on ``attrs``, each with the values that made it fail; empty when it holds."""
        return _explain(self.node, attrs)

    def attributes(self) -> frozenset[str]:
        """The attribute names the requirement reads."""
        names: set[str] = set()
        stack: list[Node] = [self.node]
        while stack:
            node = stack.pop()
            if isinstance(node, Attribute):
                names.add(node.name)
            elif isinstance(node, Compare):
                stack.extend((node.left, node.right))
            elif isinstance(node, Not):
                stack.append(node.item)
            elif isinstance(node, And | Or):
                stack.extend(node.items)
        return frozenset(names)

    def __str__(self) -> str:
        return format_node(self.node)


ALWAYS = Requirement(Literal(True))
