"""Quantities an owner or a deployer writes by hand: sizes, cores, bandwidth, percentages.

One spelling everywhere (the contribution in the node's config, a manifest's resources, the
requirements language), so ``512M`` means the same thing in all three:

- sizes: a number with an optional unit. ``K``, ``M``, ``G``, ``T`` and ``KiB``, ``MiB``,
  ``GiB``, ``TiB`` (also ``Ki``, ``Mi``, ...) are powers of 1024, as ``ulimit`` and Docker
  read them; ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000; ``B`` or no unit is bytes.
- cores: a plain number (``2``, ``1.5``, ``0.25``).
- bandwidth in bits per second: ``100Mbit`` / ``100Mbps`` (powers of 1000, as link speeds
  are quoted), ``kbit``, ``Gbit``; a plain number is bits per second.
- a percentage of the machine (``50%``) where the caller knows the machine.

This module is pure: it parses and formats, nothing more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

#: Size units, longest spellings first so that ``KiB`` is not read as ``K``.
SIZE_UNITS: dict[str, int] = {
    "KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB,
    "Ki": KIB, "Mi": MIB, "Gi": GIB, "Ti": TIB,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "K": KIB, "M": MIB, "G": GIB, "T": TIB,
    "k": KIB, "m": MIB, "g": GIB, "t": TIB,
    "B": 1,
}  # fmt: skip

BANDWIDTH_UNITS: dict[str, int] = {
    "bit": 1, "kbit": 1000, "Kbit": 1000, "Mbit": 1000**2, "Gbit": 1000**3,
    "bps": 1, "kbps": 1000, "Kbps": 1000, "Mbps": 1000**2, "Gbps": 1000**3,
}  # fmt: skip

_NUMBER = r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(_NUMBER + r"\s*(?P<unit>[A-Za-z]*)")
_PERCENT_RE = re.compile(_NUMBER + r"\s*%")


class UnitError(ValueError):
    """A quantity could not be read; the message says what was expected."""


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text`` (``"512M"``, ``"2GiB"``, ``"1.5G"``, ``4096``); raise :class:`UnitError`."""
    return _parse_quantity(text, "size", "512M or 2G", "B", SIZE_UNITS, "K, M, G, T, KiB..., KB..., or B")


def parse_cores(text: str | int | float) -> float:
    """Cores in ``text`` (``2``, ``"1.5"``); raise :class:`UnitError`."""
    if isinstance(text, bool):
        raise UnitError(f"expected a number of cores such as 2 or 0.5 (got {text!r})")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UnitError(f"expected a number of cores such as 2 or 0.5 (got {text!r})") from None
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"a number of cores must be finite and >= 0 (got {text!r})")
    return value


def parse_bandwidth(text: str | int | float) -> int:
    """Bits per second in ``text`` (``"100Mbit"``, ``"10Mbps"``, ``1000000``); raise :class:`UnitError`."""
    return _parse_quantity(text, "bandwidth", "100Mbit", "bit", BANDWIDTH_UNITS, "bit, kbit, Mbit, Gbit")


DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> int:
    """Whole seconds in ``text`` (``"24h"``, ``"30m"``, ``"7d"``, ``90``); raise :class:`UnitError`."""
    return _parse_quantity(text, "duration", "24h or 30m", "s", DURATION_UNITS, "s, m, h, d")


def _parse_quantity(
    text: str | int | float, noun: str, example: str, default_unit: str, units: Mapping[str, int], known: str
) -> int:
    """A whole quantity: a number as it is, or a number and a unit of ``units`` (``default_unit``
    when none is written); the errors call it a ``noun``, give ``example`` and list ``known``."""
    if isinstance(text, bool):
        raise UnitError(f"expected a {noun} such as {example} (got {text!r})")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise UnitError(f"a {noun} must be a finite number >= 0 (got {text!r})")
        return int(text)
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise UnitError(f"expected a {noun} such as {example} (got {text!r})")
    unit = match["unit"] or default_unit
    factor = units.get(unit)
    if factor is None:
        raise UnitError(f"unknown {noun} unit {unit!r} in {text!r} (use {known})")
    return int(float(match["number"]) * factor)


def parse_percent(text: object) -> float | None:
    """The fraction in ``"50%"`` (0.5), or ``None`` when ``text`` is not a percentage."""
    if not isinstance(text, str):
        return None
    match = _PERCENT_RE.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match["number"]) / 100
    if value > 1:
        raise UnitError(f"a share of the machine must be at most 100% (got {text!r})")
    return value


def format_size(size_bytes: int | float) -> str:
    """``536870912`` -> ``512 MiB``; exact multiples print without decimals."""
    value = float(size_bytes)
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(value) >= factor:
            scaled = value / factor
            return f"{scaled:.0f} {unit}" if scaled == int(scaled) else f"{scaled:.1f} {unit}"
    return f"{value:.0f} B"


def format_cores(cores: float) -> str:
    """``1`` -> ``1 core``, ``2`` -> ``2 cores``, ``0.5`` -> ``0.5 cores``."""
    text = f"{cores:.2f}".rstrip("0").rstrip(".")
    return f"{text} core" if text == "1" else f"{text} cores"


def format_cores_number(cores: float) -> str:
    """Cores without the unit: ``2.0`` -> ``2``, ``0.25`` -> ``0.25``."""
    return f"{cores:.2f}".rstrip("0").rstrip(".")


def format_bandwidth(bits_per_s: int | float) -> str:
    for unit, factor in (("Gbit/s", 1000**3), ("Mbit/s", 1000**2), ("kbit/s", 1000)):
        if bits_per_s >= factor:
            scaled = bits_per_s / factor
            return f"{scaled:.0f} {unit}" if scaled == int(scaled) else f"{scaled:.1f} {unit}"
    return f"{bits_per_s:.0f} bit/s"
