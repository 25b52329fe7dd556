"""The service manifest: what a service is, what it needs, how to run and watch it.

``manifest.toml`` sits at the root of a bundle::

    name = "hello"
    version = "1.0.0"
    command = ["python3", "app.py"]     # argv, run in the unpacked bundle's directory
    tags = ["web"]

    [env]                               # added to PORT, P2PDEPLOY_DATA_DIR and the bindings
    GREETING = "hello"

    [resources]
    cpu = 0.5                           # cores reserved (cgroup cpu quota where available)
    memory = "64M"                      # memory limit (cgroup, else RLIMIT_AS)
    disk = "32M"
    requirements = 'os == "linux" and arch in {"x86_64", "aarch64"}'
    # optional: bandwidth, cpu_time_s (RLIMIT_CPU), open_files, processes, file_size

    [health]                            # kind = "none" | "tcp" | "http" | "command"
    kind = "http"
    path = "/health"
    interval_s = 2
    failures = 3

    [restart]                           # policy = "never" | "on-failure" | "always"
    policy = "on-failure"
    max_restarts = 5

    [stop]
    grace_s = 5

    [logs]
    max_bytes = "256K"
    files = 3

    [placement]                         # replicas = N, or availability = target; not both
    availability = 0.999                # replicas from measured node uptime, within min..max
    min_replicas = 2
    max_replicas = 5
    spread = ["owner"]                  # node attributes to spread the replicas over
    constraints = 'region in {"eu", "us"}'
    # mode = "every": one replica on every node that satisfies the constraints

    [state]                             # consistency = "none" | "eventual" | "quorum"
    consistency = "eventual"

    [simulation]                        # only the simulator reads it
    start_delay_s = 0.5

Every error names the file and the field: ``manifest.toml: placement.replicas must be >= 1
(got 0)``; an unknown key is an error too, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.executor import (
    HealthCheck,
    Limits,
    LogPolicy,
    ProcessSpec,
    SimulatedBehaviour,
)
from p2pdeploy.fabric.supervisor import ReplicaSpec, RestartPolicy
from p2pdeploy.fabric.units import MIB, UnitError, parse_bandwidth, parse_cores, parse_size
from p2pdeploy.resource.requirements import ParseError, Requirement

MANIFEST_NAME = "manifest.toml"
MAX_MANIFEST_BYTES = 64 * 1024
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Variables the node sets itself; a manifest may not override them.
#: The variable naming the service a replica runs (its manifest's ``name``).
SERVICE_VARIABLE = "P2PDEPLOY_SERVICE"
RESERVED_ENV = frozenset({"PORT", "P2PDEPLOY_DATA_DIR", "P2PDEPLOY_REPLICA_ID", SERVICE_VARIABLE,
                          "P2PDEPLOY_STATE_URL", "P2PDEPLOY_STATE_TOKEN"})
#: Variables that change how the dynamic loader or the C library starts a program: glibc's list of
#: those it drops for setuid programs (``unsecure-envvars.h``), every ``LD_*`` and ``MALLOC_*``. The
#: node starts a service as root and drops to the service's user on the way, so a manifest may not
#: set them. (``TMPDIR``, on glibc's list too, only says where the service keeps its own files.)
LOADER_ENV = frozenset({"GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
                        "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR"})
LOADER_ENV_PREFIXES = ("LD_", "MALLOC_")

SECTIONS: dict[str, tuple[str, ...]] = {
    "": ("name", "version", "command", "tags", "description", "env", "resources", "health", "restart",
         "stop", "logs", "placement", "state", "simulation"),
    "resources": ("cpu", "memory", "disk", "bandwidth", "cpu_time_s", "open_files", "processes", "file_size",
                  "requirements"),
    "health": ("kind", "port", "path", "command", "interval_s", "timeout_s", "failures", "start_period_s",
               "start_interval_s"),
    "restart": ("policy", "backoff_initial_s", "backoff_max_s", "backoff_factor", "max_restarts", "window_s"),
    "stop": ("grace_s",),
    "logs": ("max_bytes", "files"),
    "placement": ("replicas", "availability", "min_replicas", "max_replicas", "spread", "constraints", "mode"),
    "state": ("consistency",),
    "simulation": ("start_delay_s", "exit_after_s", "exit_code", "ignores_term", "healthy", "log_bytes_per_s",
                   "memory_peak", "crash_rate_per_s"),
}  # fmt: skip


class ManifestError(ValueError):
    """A manifest is not valid; the message names the file and the field."""


#: The most replicas a placement may ask for, by count or as the ceiling of an availability target.
MAX_REPLICAS = 64
PLACEMENT_MODES = ("count", "every")
STATE_CONSISTENCIES = ("none", "eventual", "quorum")
ATTRIBUTE_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Placement:
    """How many replicas a service wants and where they may go (the ``[placement]`` table).

    Either a fixed count (``replicas``) or an availability target (``availability``, such as
    0.999) from which the deployer derives a count between ``min_replicas`` and ``max_replicas``
    using the measured uptime of the candidate nodes; neither given means one replica. ``mode =
    "every"`` instead runs one replica on every node that satisfies ``constraints``. ``spread``
    names node attributes (``owner``, ``region``) whose values the replicas should differ in,
    the first the most important. The constructor checks the rules, so a placement built in
    code is as valid as one read from a manifest; a broken rule raises :class:`ValueError`
    naming the field.
    """

    replicas: int | None = None
    availability: float | None = None
    min_replicas: int = 1
    max_replicas: int = 7
    spread: tuple[str, ...] = ("owner",)
    constraints: Requirement | None = None
    mode: str = "count"

    def __post_init__(self) -> None:
        object.__setattr__(self, "spread", tuple(self.spread))
        problem = placement_problem(self)
        if problem is not None:
            raise ValueError(problem)
        if self.mode == "count" and self.replicas is None and self.availability is None:
            object.__setattr__(self, "replicas", 1)  # neither given: one replica

    def to_table(self) -> dict[str, Any]:
        """The placement as a ``[placement]`` table (what the manifest reader reads back)."""
        table: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "spread": list(self.spread),
            "mode": self.mode,
        }
        if self.replicas is not None:
            table["replicas"] = self.replicas
        if self.availability is not None:
            table["availability"] = self.availability
        if self.constraints is not None:
            table["constraints"] = str(self.constraints)
        return table


def placement_problem(p: Placement) -> str | None:
    """The first rule ``p`` breaks, as ``placement.FIELD REASON``; None when it keeps them all."""
    if p.mode not in PLACEMENT_MODES:
        return f'placement.mode must be "count" or "every" (got {p.mode!r})'
    if p.mode == "every":
        for name in ("replicas", "availability"):
            if getattr(p, name) is not None:
                return (f'placement.{name} cannot be given with placement.mode = "every" '
                        "(one replica runs on every node that satisfies placement.constraints)")
    if p.replicas is not None and p.availability is not None:
        return ("placement.replicas and placement.availability are mutually exclusive "
                "(a fixed count, or a count derived from the availability target)")
    if p.replicas is not None:
        if p.replicas < 1:
            return f"placement.replicas must be >= 1 (got {p.replicas})"
        if p.replicas > MAX_REPLICAS:
            return f"placement.replicas must be <= {MAX_REPLICAS} (got {p.replicas})"
    if p.availability is not None and not 0 < p.availability < 1:
        return f"placement.availability must be between 0 and 1 (got {p.availability})"
    if p.min_replicas < 1:
        return f"placement.min_replicas must be >= 1 (got {p.min_replicas})"
    if p.max_replicas < p.min_replicas:
        return f"placement.max_replicas must be >= placement.min_replicas ({p.min_replicas}) (got {p.max_replicas})"
    if p.max_replicas > MAX_REPLICAS:
        return f"placement.max_replicas must be <= {MAX_REPLICAS} (got {p.max_replicas})"
    for name in p.spread:
        if not isinstance(name, str) or ATTRIBUTE_NAME_RE.fullmatch(name) is None:
            return f"placement.spread must name node attributes ([a-z_][a-z0-9_]*) (got {name!r})"
    if len(set(p.spread)) != len(p.spread):
        return f"placement.spread must not name an attribute twice (got {list(p.spread)!r})"
    return None


def env_name_problem(name: str) -> str | None:
    """Why a service may not set the environment variable ``name``, or None when it may."""
    if ENV_NAME_RE.fullmatch(name) is None:
        return "is not a valid environment variable name"
    if name in RESERVED_ENV:
        return "is set by the node and cannot be overridden"
    if name in LOADER_ENV or name.startswith(LOADER_ENV_PREFIXES):
        return ("changes how the dynamic loader or the C library starts a program, "
                "which a service may not do on a volunteer's node")  # fmt: skip
    return None


@dataclass(frozen=True, slots=True)
class Resources:
    cpu_cores: float = 0.25
    memory_bytes: int = 128 * MIB
    disk_bytes: int = 64 * MIB
    bandwidth_bps: int = 0
    cpu_time_s: int | None = None
    open_files: int = 1024
    processes: int = 64
    file_size_bytes: int | None = None
    requirements: Requirement | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    command: tuple[str, ...]
    tags: frozenset[str] = frozenset()
    description: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    health: HealthCheck = field(default_factory=HealthCheck)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_s: float = 10.0
    logs: LogPolicy = field(default_factory=LogPolicy)
    placement: Placement = field(default_factory=Placement)
    #: How the service's state is replicated: "none", "eventual" or "quorum".
    state_consistency: str = "none"
    simulated: SimulatedBehaviour | None = None

    @property
    def replicas(self) -> int:
        """The fixed replica count, or with an availability target or mode "every" the least
        (``placement.min_replicas``); the deployer decides the actual count."""
        p = self.placement
        return p.replicas if p.replicas is not None else p.min_replicas

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        if isinstance(text, bytes):
            if len(text) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise ManifestError(f"{source}: not UTF-8 text") from None
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_table(table, source)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        return _Reader(source).manifest(table)

    # -- what it asks of a node ------------------------------------------------------------
    def demand(self) -> Demand:
        r = self.resources
        return Demand(r.cpu_cores, r.memory_bytes, r.disk_bytes, r.bandwidth_bps, self.tags)

    def limits(self) -> Limits:
        r = self.resources
        return Limits(
            memory_bytes=r.memory_bytes,
            cpu_cores=r.cpu_cores if r.cpu_cores > 0 else None,
            cpu_time_s=r.cpu_time_s,
            open_files=r.open_files,
            file_size_bytes=r.file_size_bytes or max(r.disk_bytes, MIB),
            processes=r.processes,
            disk_bytes=r.disk_bytes,
        )

    def replica_spec(
        self,
        replica_id: str,
        *,
        port: int | None = None,
        bindings: Mapping[str, str] | None = None,
    ) -> ReplicaSpec:
        """How to run one replica: the manifest's command and limits, its env plus ``bindings``."""
        env = dict(self.env)
        for key, value in (bindings or {}).items():
            problem = env_name_problem(key)
            if problem is not None:
                raise ManifestError(f"binding {key!r} {problem}")
            env[key] = value
        env[SERVICE_VARIABLE] = self.name
        process = ProcessSpec(
            replica_id=replica_id,
            run=1,
            argv=self.command,
            env=env,
            port=port,
            limits=self.limits(),
            logs=self.logs,
            simulated=self.simulated,
        )
        return ReplicaSpec(process, self.health, self.restart, self.stop_grace_s)


class _Reader:
    """Validates a manifest table, naming the file and field in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {where} {message}")

    def section(self, table: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = table.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table (got {value!r})")
        self.known(value, name)
        return value

    def known(self, table: Mapping[str, Any], name: str) -> None:
        allowed = SECTIONS[name]
        for key in table:
            if key not in allowed:
                where = f"{name}.{key}" if name else key
                raise self.fail(where, f"is not a manifest field (known{' in ' + name if name else ''}: {', '.join(allowed)})")

    def string(self, table: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
        if key not in table:
            if default is None:
                raise self.fail(where, "is required")
            return default
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string (got {value!r})")
        return value

    def argv(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(where, f'must be a non-empty list of strings, such as ["python3", "app.py"] (got {value!r})')
        return tuple(value)

    def number(self, table: Mapping[str, Any], key: str, where: str, default: Any, *, minimum: float = 0,
               integer: bool = False, strict: bool = False) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise self.fail(where, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
        if value < minimum or (strict and value == minimum):
            raise self.fail(where, f"must be {'>' if strict else '>='} {minimum:g} (got {value!r})")
        return value

    def amount(self, table: Mapping[str, Any], key: str, where: str, default: Any, parse: Callable[[Any], Any]) -> Any:
        if key not in table:
            return default
        try:
            return parse(table[key])
        except UnitError as exc:
            raise self.fail(where, f"is not valid: {exc}") from None

    def manifest(self, table: Mapping[str, Any]) -> Manifest:
        self.known(table, "")
        name = self.string(table, "name", "name")
        if NAME_RE.fullmatch(name) is None:
            raise self.fail("name", f"must be 1-48 characters of a-z, 0-9 and '-', starting with a letter or digit (got {name!r})")
        version = self.string(table, "version", "version")
        if not version or len(version) > 64:
            raise self.fail("version", f"must be 1-64 characters (got {version!r})")
        if "command" not in table:
            raise self.fail("command", 'is required (the argv to run, such as ["python3", "app.py"])')
        command = self.argv(table["command"], "command")
        tags = table.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise self.fail("tags", f"must be a list of non-empty strings (got {tags!r})")
        description = self.string(table, "description", "description", default="")
        env_table = table.get("env", {})
        if not isinstance(env_table, dict):
            raise self.fail("env", f"must be a table of strings (got {env_table!r})")
        env: dict[str, str] = {}
        for key, value in env_table.items():
            problem = env_name_problem(key)
            if problem is not None:
                raise self.fail(f"env.{key}", problem)
            if not isinstance(value, str):
                raise self.fail(f"env.{key}", f"must be a string (got {value!r})")
            env[key] = value
        state = self.section(table, "state")
        consistency = self.string(state, "consistency", "state.consistency", default="none")
        if consistency not in STATE_CONSISTENCIES:
            raise self.fail("state.consistency", f'must be "none", "eventual" or "quorum" (got {consistency!r})')
        stop = self.section(table, "stop")
        grace_s = self.number(stop, "grace_s", "stop.grace_s", 10.0)
        return Manifest(
            name=name,
            version=version,
            command=command,
            tags=frozenset(tags),
            description=description,
            env=env,
            resources=self.resources(self.section(table, "resources")),
            health=self.health(self.section(table, "health")),
            restart=self.restart(self.section(table, "restart")),
            stop_grace_s=float(grace_s),
            logs=self.logs(self.section(table, "logs")),
            placement=self.placement(self.section(table, "placement")),
            state_consistency=consistency,
            simulated=self.simulation(table),
        )

    def requirement(self, t: Mapping[str, Any], key: str, where: str) -> Requirement | None:
        if key not in t:
            return None
        text = t[key]
        if not isinstance(text, str):
            raise self.fail(where, f"must be a string (got {text!r})")
        try:
            return Requirement.parse(text)
        except ParseError as exc:
            raise self.fail(where, f"is not valid: {exc}") from None

    def placement(self, t: Mapping[str, Any]) -> Placement:
        w = "placement."
        d = Placement()
        availability = self.number(t, "availability", w + "availability", None)
        spread = t.get("spread", list(d.spread))
        if not isinstance(spread, list) or not all(isinstance(name, str) for name in spread):
            raise self.fail(w + "spread", f'must be a list of attribute names, such as ["owner"] (got {spread!r})')
        mode = self.string(t, "mode", w + "mode", default=d.mode)
        values = dict(
            replicas=self.number(t, "replicas", w + "replicas", None, minimum=1, integer=True),
            availability=None if availability is None else float(availability),
            min_replicas=self.number(t, "min_replicas", w + "min_replicas", d.min_replicas, minimum=1, integer=True),
            max_replicas=self.number(t, "max_replicas", w + "max_replicas", d.max_replicas, minimum=1, integer=True),
            spread=tuple(spread),
            constraints=self.requirement(t, "constraints", w + "constraints"),
            mode=mode,
        )
        try:
            return Placement(**values)
        except ValueError as exc:  # the rules between fields, which Placement itself checks
            raise ManifestError(f"{self.source}: {exc}") from None

    def resources(self, t: Mapping[str, Any]) -> Resources:
        d = Resources()
        w = "resources."
        requirements = self.requirement(t, "requirements", w + "requirements")
        file_size = self.amount(t, "file_size", w + "file_size", None, parse_size)
        if file_size is not None and file_size < 1:
            raise self.fail(w + "file_size", f"must be >= 1 byte (got {t['file_size']!r})")
        cpu_time = self.number(t, "cpu_time_s", w + "cpu_time_s", None, minimum=1, integer=True)
        memory = self.amount(t, "memory", w + "memory", d.memory_bytes, parse_size)
        if memory < MIB:
            raise self.fail(w + "memory", f"must be at least 1M (got {t.get('memory')!r})")
        return Resources(
            cpu_cores=self.amount(t, "cpu", w + "cpu", d.cpu_cores, parse_cores),
            memory_bytes=memory,
            disk_bytes=self.amount(t, "disk", w + "disk", d.disk_bytes, parse_size),
            bandwidth_bps=self.amount(t, "bandwidth", w + "bandwidth", d.bandwidth_bps, parse_bandwidth),
            cpu_time_s=cpu_time,
            open_files=self.number(t, "open_files", w + "open_files", d.open_files, minimum=16, integer=True),
            processes=self.number(t, "processes", w + "processes", d.processes, minimum=1, integer=True),
            file_size_bytes=file_size,
            requirements=requirements,
        )

    def health(self, t: Mapping[str, Any]) -> HealthCheck:
        w = "health."
        d = HealthCheck()
        kind = self.string(t, "kind", w + "kind", default="none")
        if kind not in ("none", "tcp", "http", "command"):
            raise self.fail(w + "kind", f'must be "none", "tcp", "http" or "command" (got {kind!r})')
        argv: tuple[str, ...] = ()
        if kind == "command" or "command" in t:
            if "command" not in t:
                raise self.fail(w + "command", "is required when health.kind is command")
            argv = self.argv(t["command"], w + "command")
        path = self.string(t, "path", w + "path", default="/")
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise self.fail(w + "path", f"must start with / and hold no spaces (got {path!r})")
        port = self.number(t, "port", w + "port", None, minimum=1, integer=True)
        if port is not None and port > 65535:
            raise self.fail(w + "port", f"must be <= 65535 (got {port})")
        return HealthCheck(
            kind=kind,
            port=port,
            path=path,
            argv=argv,
            interval_s=float(self.number(t, "interval_s", w + "interval_s", d.interval_s, strict=True)),
            timeout_s=float(self.number(t, "timeout_s", w + "timeout_s", d.timeout_s, strict=True)),
            failures=self.number(t, "failures", w + "failures", d.failures, minimum=1, integer=True),
            start_period_s=float(self.number(t, "start_period_s", w + "start_period_s", d.start_period_s, strict=True)),
            start_interval_s=float(
                self.number(t, "start_interval_s", w + "start_interval_s", d.start_interval_s, strict=True)
            ),
        )

    def restart(self, t: Mapping[str, Any]) -> RestartPolicy:
        w = "restart."
        d = RestartPolicy()
        mode = self.string(t, "policy", w + "policy", default=d.mode)
        if mode not in ("never", "on-failure", "always"):
            raise self.fail(w + "policy", f'must be "never", "on-failure" or "always" (got {mode!r})')
        policy = RestartPolicy(
            mode=mode,  # type: ignore[arg-type]
            backoff_initial_s=float(self.number(t, "backoff_initial_s", w + "backoff_initial_s", d.backoff_initial_s, strict=True)),
            backoff_max_s=float(self.number(t, "backoff_max_s", w + "backoff_max_s", d.backoff_max_s, strict=True)),
            backoff_factor=float(self.number(t, "backoff_factor", w + "backoff_factor", d.backoff_factor, minimum=1)),
            max_restarts=self.number(t, "max_restarts", w + "max_restarts", d.max_restarts, integer=True),
            window_s=float(self.number(t, "window_s", w + "window_s", d.window_s, strict=True)),
        )
        if policy.backoff_max_s < policy.backoff_initial_s:
            raise self.fail(w + "backoff_max_s", f"must be >= restart.backoff_initial_s (got {policy.backoff_max_s:g})")
        return policy

    def logs(self, t: Mapping[str, Any]) -> LogPolicy:
        d = LogPolicy()
        max_bytes = self.amount(t, "max_bytes", "logs.max_bytes", d.max_bytes, parse_size)
        if max_bytes < 1024:
            raise self.fail("logs.max_bytes", f"must be at least 1K (got {t.get('max_bytes')!r})")
        files = self.number(t, "files", "logs.files", d.files, minimum=1, integer=True)
        if files > 100:
            raise self.fail("logs.files", f"must be <= 100 (got {files})")
        return LogPolicy(max_bytes, files)

    def simulation(self, table: Mapping[str, Any]) -> SimulatedBehaviour | None:
        if "simulation" not in table:
            return None
        t = self.section(table, "simulation")
        w = "simulation."
        for key in ("ignores_term", "healthy"):
            if key in t and not isinstance(t[key], bool):
                raise self.fail(w + key, f"must be true or false (got {t[key]!r})")
        return SimulatedBehaviour(
            start_delay_s=self.number(t, "start_delay_s", w + "start_delay_s", None),
            exit_after_s=self.number(t, "exit_after_s", w + "exit_after_s", None),
            exit_code=self.number(t, "exit_code", w + "exit_code", 0, integer=True),
            ignores_term=t.get("ignores_term", False),
            healthy=t.get("healthy", True),
            log_bytes_per_s=float(self.number(t, "log_bytes_per_s", w + "log_bytes_per_s", 0.0)),
            memory_peak_bytes=self.amount(t, "memory_peak", w + "memory_peak", 0, parse_size),
            crash_rate_per_s=float(self.number(t, "crash_rate_per_s", w + "crash_rate_per_s", 0.0)),
        )
