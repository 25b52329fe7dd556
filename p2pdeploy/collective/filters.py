"""Content filters for publish/subscribe: the requirements language applied to an event's attributes.

A subscriber writes the same expressions a service manifest uses for node requirements
(:mod:`p2pdeploy.resource.requirements`), over the attributes of an event::

    service == "wiki" and state in {"failed", "stopped"}
    kind == "node_joined" and memory_free >= 2G and "gpu" in tags

So the grammar, the size units, the rules for missing attributes (a comparison with an
attribute the event does not have is false) and the error columns are the requirement
language's; this module adds only what a filter needs on top:

- an empty (or all-blank) filter matches every event, where an empty requirement is an error;
- errors say ``filter:`` rather than ``requirement:`` (:class:`FilterError`, still a
  ``ValueError`` with the 1-based ``column``);
- :func:`event_value` checks that an attribute value can be matched and can travel (bool,
  int, float, str, or a set of strings), which the requirement language leaves to its callers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from p2pdeploy.resource.requirements import ALWAYS, ParseError, Requirement

#: Attribute names an event may carry: the requirement language's names.
MAX_ATTRIBUTES = 256


class FilterError(ValueError):
    """A filter expression is not well formed; ``column`` is 1-based (0 for a non-text filter)."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed content filter; ``str()`` gives its canonical text ("" for match-everything)."""

    requirement: Requirement
    source: str = ""

    @classmethod
    def parse(cls, source: str | None) -> Filter:
        """Parse ``source``; ``None`` or blank text matches everything. Raise :class:`FilterError`."""
        if source is None:
            return MATCH_ALL
        if not isinstance(source, str):
            raise FilterError(f"filter: expected text, not {type(source).__name__}", 0)
        if not source.strip():
            return MATCH_ALL
        try:
            return cls(Requirement.parse(source), source)
        except ParseError as exc:
            message = str(exc)
            if message.startswith("requirement:"):
                message = "filter:" + message[len("requirement:"):]
            raise FilterError(message, exc.column) from None

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        return self.requirement.evaluate(attributes)

    def explain(self, attributes: Mapping[str, Any]) -> list[str]:
        """The clauses that do not hold for ``attributes`` (empty when the event matches)."""
        return self.requirement.explain(attributes)

    @property
    def matches_everything(self) -> bool:
        return self.requirement is ALWAYS

    def __str__(self) -> str:
        return "" if self.matches_everything else str(self.requirement)


MATCH_ALL = Filter(ALWAYS, "")


def event_value(name: str, value: Any) -> bool | int | float | str | list[str]:
    """``value`` as an event attribute may hold it (sets become sorted lists of strings);
    raise ``TypeError``/``ValueError`` naming ``name`` when it cannot be one."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"event attribute {name} must be a finite number (got {value})")
        return value
    if isinstance(value, set | frozenset | list | tuple):
        if not all(isinstance(item, str) for item in value):
            raise TypeError(f"event attribute {name} may hold a set of strings only (got {value!r})")
        return sorted(set(value))
    raise TypeError(
        f"event attribute {name} must be a bool, number, string or set of strings (got {type(value).__name__})"
    )


def event_attributes(attributes: Mapping[str, Any]) -> dict[str, bool | int | float | str | list[str]]:
    """Check and normalise a whole attribute mapping for publishing."""
    if not isinstance(attributes, Mapping):
        raise TypeError(f"event attributes are a mapping of names to values (got {type(attributes).__name__})")
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValueError(f"an event has at most {MAX_ATTRIBUTES} attributes (got {len(attributes)})")
    out: dict[str, bool | int | float | str | list[str]] = {}
    for name, value in attributes.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"event attribute names are non-empty strings (got {name!r})")
        out[name] = event_value(name, value)
    return out


__all__ = ["MATCH_ALL", "Filter", "FilterError", "event_attributes", "event_value"]
