"""The scenario schema: every key, its default, its type and its range, documented in one place.

A scenario file is TOML. Keys that every scenario shares are in :data:`BASE_SCHEMA` below; a
runner adds its own tables (``[ping]`` for ``protocol = "ping"``) through ``Runner.schema``. Every
key has a default, so a scenario file only states what differs. Validation names the file and
the key: ``ping.toml: network.loss must be between 0 and 1 (got 1.5)``.

Types are strict: an integer key rejects ``1.5`` and ``true``; a float key accepts an integer
and rejects ``inf`` and ``nan``; a table key rejects a scalar and the other way round; an
unknown key is an error, with a suggestion when a known key is close.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar, Union

from p2pdeploy.sim.churn import DISTRIBUTIONS
from p2pdeploy.sim.network import LATENCY_MODELS, NetworkConfig


class ScenarioError(Exception):
    """A scenario file or an override is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Field:
    """One scenario key: its default, type (``int``, ``float``, ``bool`` or ``str``) and range."""

    default: Any
    kind: type
    doc: str
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit this field (``None`` when it fits)."""
        kind = self.kind
        if kind is bool:
            if type(value) is not bool:
                return "must be true or false"
        elif kind is int:
            if type(value) is not int:
                return "must be an integer"
        elif kind is float:
            if type(value) not in (int, float):
                return "must be a number"
            if not math.isfinite(value):
                return "must be a finite number"
        elif kind is str:
            if type(value) is not str:
                return "must be a string"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}"
        if kind in (int, float):
            if self.ge is not None and self.le is not None and not self.ge <= value <= self.le:
                return f"must be between {_num(self.ge)} and {_num(self.le)}"
            if self.ge is not None and value < self.ge:
                return f"must be >= {_num(self.ge)}"
            if self.gt is not None and value <= self.gt:
                return f"must be > {_num(self.gt)}"
            if self.le is not None and value > self.le:
                return f"must be <= {_num(self.le)}"
        return None


#: A table of the schema: keys to fields or to nested tables.
Section = dict[str, Union[Field, "Section"]]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class Tunable:
    """A key that sets the field of the same name of a layer's config dataclass: only its doc and
    range are written here; its default and type are the config's (see :func:`config_keys`)."""

    doc: str
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None


_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def config_keys(config_class: type, **keys: Tunable) -> Section:
    """Keys for fields of ``config_class``, in the order given, with the config's defaults and
    types, so a default is written once, where the layer declares it."""
    by_name = {f.name: f for f in fields(config_class)}  # type: ignore[arg-type]
    section: Section = {}
    for name, key in keys.items():
        f = by_name.get(name)
        kind = None if f is None else _KINDS.get(f.type if isinstance(f.type, str) else f.type.__name__)
        if f is None or f.default is MISSING or kind is None:
            raise TypeError(f"{config_class.__name__}.{name} is not a field with a default of type int, float, bool or str")
        section[name] = Field(f.default, kind, key.doc, key.choices, key.ge, key.gt, key.le)
    return section


def _length_table(distribution: str, median_s: float, shape: float, what: str) -> Section:
    return {
        "distribution": Field(distribution, str, f"distribution of {what} lengths", choices=DISTRIBUTIONS),
        "median_s": Field(median_s, float, f"median {what} length, seconds", gt=0),
        "shape": Field(shape, float, "Weibull k or Pareto alpha; unused by exponential", gt=0),
    }


#: Keys every scenario has. Runners add tables of their own (see ``p2pdeploy.sim.runner``).
BASE_SCHEMA: Section = {
    "protocol": Field("ping", str, "the runner that executes this scenario (a registered runner name)"),
    "description": Field("", str, "free text for humans"),
    "nodes": Field(1000, int, "number of simulated nodes, addresses 0 .. nodes-1", ge=1),
    "duration_s": Field(60.0, float, "simulated time to run, seconds", gt=0),
    "seed": Field(1, int, "the seed every random stream derives from (--seed overrides it)"),
    "trace": Field(True, bool, "hash the event trace (trace_hash); false runs a little faster"),
    "network": config_keys(
        NetworkConfig,
        latency_model=Tunable("pairwise latency model", choices=LATENCY_MODELS),
        base_latency_ms=Tunable("one-way latency every pair has at least, ms", ge=0),
        latency_scale_ms=Tunable(
            "euclidean: ms per unit of distance in the unit square; uniform: width of U(0, scale); "
            "lognormal: median of the pairwise part; constant: unused",
            ge=0,
        ),
        latency_sigma=Tunable("lognormal shape (sigma of the log)", gt=0),
        jitter_ms=Tunable("each message adds U(0, jitter_ms), ms", ge=0),
        loss=Tunable("probability that a datagram is lost", ge=0, le=1),
        upload_bytes_per_s=Tunable("per-node uplink for large messages", gt=0),
        download_bytes_per_s=Tunable("per-node downlink for large messages", gt=0),
        large_message_bytes=Tunable("messages larger than this go by stream: no loss, bandwidth applies", ge=0),
        encode=Tunable(
            "messages travel as wire bytes (encoded, decoded, bad ones dropped and counted), as on a "
            "socket; false passes objects, faster, and the trace hash no longer covers message content"
        ),
    ),
    "churn": {
        "model": Field("none", str, "none, sessions (alternating renewal) or trace", choices=("none", "sessions", "trace")),
        "start_s": Field(0.0, float, "churn begins at this time (a warm-up before it); a trace's time 0", ge=0),
        "trace_file": Field("", str, "trace model: CSV time_s,node,up|down; relative to the scenario file"),
        "session": _length_table("weibull", 3600.0, 0.5, "session"),
        "downtime": _length_table("exponential", 600.0, 1.0, "downtime"),
    },
    "metrics": {
        "sample_interval_s": Field(1.0, float, "simulated seconds between metric samples", gt=0),
        "per_node": Field(True, bool, "also sample per-node metrics (nodes.csv)"),
    },
}


def defaults(schema: Section) -> dict[str, Any]:
    """The fully resolved values of a scenario that sets nothing."""
    return {key: defaults(spec) if isinstance(spec, dict) else spec.default for key, spec in schema.items()}


C = TypeVar("C")


def config_from(table: Mapping[str, Any], config_class: type[C], **values: Any) -> C:
    """The dataclass ``config_class`` made from a scenario table: a key named after one of its
    fields sets that field; ``values`` set the others (a key named otherwise, a value computed
    from several keys); fields neither names keep their defaults."""
    names = {field.name for field in fields(config_class)}  # type: ignore[arg-type]
    return config_class(**{**{key: value for key, value in table.items() if key in names}, **values})


def resolve(
    raw: Mapping[str, Any],
    schema: Section,
    *,
    source: str,
    overridden: frozenset[str] = frozenset(),
    prefix: str = "",
) -> dict[str, Any]:
    """Check ``raw`` against ``schema`` and fill in defaults; raise :class:`ScenarioError`.

    ``overridden`` lists dotted keys set by ``--set``, so their errors say so.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        spec = schema.get(key)
        where = f"{source} --set" if path in overridden or any(k.startswith(path + ".") for k in overridden) else source
        if spec is None:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(schema))})"
            raise ScenarioError(f"{where}: unknown key {path}{hint}")
        if isinstance(spec, dict):
            if not isinstance(value, Mapping):
                raise ScenarioError(f"{where}: {path} must be a table, e.g. [{path}] (got {show(value)})")
            out[key] = resolve(value, spec, source=source, overridden=overridden, prefix=f"{path}.")
            continue
        if isinstance(value, Mapping):
            raise ScenarioError(f"{where}: {path} {spec.problem(None) or 'must be a value'} (got a table)")
        problem = spec.problem(value)
        if problem is not None:
            raise ScenarioError(f"{where}: {path} {problem} (got {show(value)})")
        out[key] = float(value) if spec.kind is float else value
    for key, spec in schema.items():
        if key not in out:
            out[key] = defaults(spec) if isinstance(spec, dict) else spec.default
    return out


def show(value: Any) -> str:
    """A value as TOML would spell it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return json.dumps(value, default=str)
    return repr(value)


def _num(value: float) -> str:
    return f"{value:g}"

