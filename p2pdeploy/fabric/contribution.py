"""What the owner contributes: cpu, memory, disk, bandwidth, how many services, whom it trusts.

An owner sets the contribution when a node joins (flags) or in the node's config file::

    [contribution]
    cpu = 2                 # cores, or "50%" of the machine
    memory = "2G"           # or "25%"
    disk = "10G"            # or "10%" of the free disk
    bandwidth = "20Mbit"    # optional; bits per second
    max_services = 4
    trusted_keys = "any"    # or ["<64 hex digits of an Ed25519 public key>", ...]
    allowed_tags = ["web"]  # or "any"
    tags = ["ssd"]          # what this machine advertises ("gpu" in tags)
    owner = "alice"         # optional, for requirements such as not owner == "alice"
    retention = "24h"       # how long a stopped replica's files stay (for its logs and data);
                            # they count against disk until removed

Errors name the file and the key (``config.toml: contribution.memory: expected a size such
as 512M or 2G (got 'lots')``). :meth:`Contribution.clamp_to` caps every amount at what the
probe found, so a node never offers more than it has. This module reads no clock, no file and
probes nothing; the machine facts and the config file's bytes are handed in (the driver reads the
file: :func:`p2pdeploy.runtime.configfile.read_config_section`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from p2pdeploy.core import require_at_least
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.units import (
    GIB,
    UnitError,
    parse_bandwidth,
    parse_cores,
    parse_duration,
    parse_percent,
    parse_size,
)

ANY: Literal["any"] = "any"
PUBLIC_KEY_BYTES = 32

#: Keys of the ``[contribution]`` section, in the order the docs list them.
KNOWN_KEYS = (
    "cpu", "memory", "disk", "bandwidth", "max_services", "trusted_keys", "allowed_tags", "tags", "owner",
    "retention",
)  # fmt: skip
#: How long a stopped replica's files stay by default: a day.
DEFAULT_RETENTION_S = 24 * 3600


class ContributionError(ValueError):
    """The owner's contribution is not valid; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class Contribution:
    cpu_cores: float = 1.0
    memory_bytes: int = 1 * GIB
    disk_bytes: int = 5 * GIB
    #: Bits per second the owner lets services use; ``None``: not metered.
    bandwidth_bps: int | None = None
    max_services: int = 4
    #: Public keys whose bundles and requests this node accepts, or ``"any"`` (an open community).
    #: The default trusts nobody: an owner opts in.
    trusted_keys: frozenset[bytes] | Literal["any"] = frozenset()
    #: Service tags the owner accepts, or ``"any"``.
    allowed_tags: frozenset[str] | Literal["any"] = ANY
    #: Tags this machine advertises to requirements (``"gpu" in tags``).
    tags: frozenset[str] = field(default_factory=frozenset)
    owner: str = ""
    #: Seconds a finished replica's files (its data and logs) stay on disk, counted against
    #: ``disk_bytes`` with the disk it reserved, before the node removes them.
    retention_s: float = DEFAULT_RETENTION_S

    def __post_init__(self) -> None:
        if not self.cpu_cores >= 0:
            raise ContributionError(f"contribution.cpu must be >= 0 (got {self.cpu_cores})")
        require_at_least(self, "contribution.", 0, "memory_bytes", "disk_bytes", "max_services", "retention_s",
                         error=ContributionError)
        if self.bandwidth_bps is not None and self.bandwidth_bps < 0:
            raise ContributionError(f"contribution.bandwidth must be >= 0 (got {self.bandwidth_bps})")
        if self.trusted_keys != ANY:
            for key in self.trusted_keys:
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise ContributionError("contribution.trusted_keys holds a key that is not 32 bytes")

    # -- trust and tags --------------------------------------------------------------------
    def trusts(self, public_key: bytes) -> bool:
        """True when this owner runs bundles and requests signed by ``public_key``."""
        return self.trusted_keys == ANY or public_key in self.trusted_keys

    def trusting(self, *public_keys: bytes) -> Contribution:
        """A copy that also trusts ``public_keys`` (no change when it already trusts any key)."""
        if self.trusted_keys == ANY:
            return self
        return replace(self, trusted_keys=self.trusted_keys | frozenset(public_keys))

    def tags_refusal(self, service_tags: Iterable[str]) -> str | None:
        """Why a service with ``service_tags`` is not allowed here, or ``None`` when it is.

        With a restricted list every tag the service declares must be on it, and a service
        that declares none is refused: an owner who lists tags wants to know what runs.
        """
        if self.allowed_tags == ANY:
            return None
        tags = frozenset(service_tags)
        allowed = ", ".join(sorted(self.allowed_tags)) or "none"
        if not tags:
            return f"tags: this node accepts only services tagged {allowed}; this one has no tags"
        outside = sorted(tags - self.allowed_tags)
        if outside:
            return f"tags: {', '.join(outside)} not allowed by this node's owner (allowed: {allowed})"
        return None

    # -- the machine -----------------------------------------------------------------------
    def clamp_to(self, machine: Machine) -> Contribution:
        """This contribution, never more than ``machine`` has (cores, memory, free disk)."""
        return replace(
            self,
            cpu_cores=min(self.cpu_cores, machine.cores),
            memory_bytes=min(self.memory_bytes, machine.memory_total_bytes),
            disk_bytes=min(self.disk_bytes, machine.disk_free_bytes),
        )

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_table(
        cls,
        table: Mapping[str, Any],
        machine: Machine | None = None,
        *,
        source: str = "config.toml",
        section: str = "contribution",
    ) -> Contribution:
        """Read a ``[contribution]`` table; percentages need ``machine``; the result is clamped to it."""

        def where(key: str) -> str:
            return f"{source}: {section}.{key}" if section else f"{source}: {key}"

        unknown = sorted(set(table) - set(KNOWN_KEYS))
        if unknown:
            raise ContributionError(f"{where(unknown[0])}: unknown key (known: {', '.join(KNOWN_KEYS)})")
        defaults = cls()
        values: dict[str, Any] = {}
        amounts = (
            ("cpu", "cpu_cores", parse_cores, machine and machine.cores),
            ("memory", "memory_bytes", parse_size, machine and machine.memory_total_bytes),
            ("disk", "disk_bytes", parse_size, machine and machine.disk_free_bytes),
        )
        for key, name, parse, whole in amounts:
            if key in table:
                try:
                    amount = _amount(table[key], parse, whole)
                except UnitError as exc:
                    raise ContributionError(f"{where(key)}: {exc}") from None
                values[name] = amount if name == "cpu_cores" else int(amount)
        if "bandwidth" in table:
            try:
                values["bandwidth_bps"] = parse_bandwidth(table["bandwidth"])
            except UnitError as exc:
                raise ContributionError(f"{where('bandwidth')}: {exc}") from None
        if "max_services" in table:
            value = table["max_services"]
            if type(value) is not int or value < 0:
                raise ContributionError(f"{where('max_services')} must be an integer >= 0 (got {value!r})")
            values["max_services"] = value
        if "trusted_keys" in table:
            values["trusted_keys"] = _trusted_keys(table["trusted_keys"], where("trusted_keys"))
        if "allowed_tags" in table:
            value = table["allowed_tags"]
            values["allowed_tags"] = ANY if value == ANY else _strings(value, where("allowed_tags"))
        if "tags" in table:
            values["tags"] = _strings(table["tags"], where("tags"))
        if "retention" in table:
            try:
                values["retention_s"] = float(parse_duration(table["retention"]))
            except UnitError as exc:
                raise ContributionError(f"{where('retention')}: {exc}") from None
        if "owner" in table:
            if not isinstance(table["owner"], str):
                raise ContributionError(f"{where('owner')} must be a string (got {table['owner']!r})")
            values["owner"] = table["owner"]
        contribution = replace(defaults, **values)
        return contribution.clamp_to(machine) if machine is not None else contribution

    def to_table(self) -> dict[str, Any]:
        """The contribution as a ``[contribution]`` table (what ``from_table`` reads back)."""
        table: dict[str, Any] = {
            "cpu": self.cpu_cores,
            "memory": self.memory_bytes,
            "disk": self.disk_bytes,
            "max_services": self.max_services,
            "trusted_keys": ANY if self.trusted_keys == ANY else sorted(k.hex() for k in self.trusted_keys),
            "allowed_tags": ANY if self.allowed_tags == ANY else sorted(self.allowed_tags),
            "tags": sorted(self.tags),
            "retention": self.retention_s,
        }
        if self.bandwidth_bps is not None:
            table["bandwidth"] = self.bandwidth_bps
        if self.owner:
            table["owner"] = self.owner
        return table


def _amount(value: Any, parse: Any, whole: float | None) -> float:
    """An absolute amount, or a share (``"50%"``) of ``whole``."""
    share = parse_percent(value)
    if share is not None:
        if whole is None:
            raise UnitError(f"{value!r} is a share of the machine; probe the machine first")
        return share * whole
    return float(parse(value))


def _trusted_keys(value: Any, where: str) -> frozenset[bytes] | Literal["any"]:
    if value == ANY:
        return ANY
    if not isinstance(value, list):
        raise ContributionError(f'{where} must be "any" or a list of hex public keys (got {value!r})')
    keys = set()
    for index, item in enumerate(value):
        try:
            key = bytes.fromhex(item) if isinstance(item, str) else b""
        except ValueError:
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise ContributionError(
                f"{where}[{index}] must be a 64-digit hex Ed25519 public key (got {item!r})"
            )
        keys.add(key)
    return frozenset(keys)


def _strings(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ContributionError(f"{where} must be a list of non-empty strings (got {value!r})")
    return frozenset(value)


def parse_config_section(document: bytes, source: str, section: str = "contribution") -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file's bytes (empty when it has none); ``source`` names the file."""
    try:
        parsed = tomllib.loads(document.decode())
    except tomllib.TOMLDecodeError as exc:
        raise ContributionError(f"{source}: not valid TOML: {exc}") from None
    table = parsed.get(section, {})
    if not isinstance(table, dict):
        raise ContributionError(f"{source}: {section} must be a table ([{section}])")
    return table
