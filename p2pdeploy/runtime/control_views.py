"""How the control API's requests read on the command line: arguments in, replies out.

Each request :mod:`~p2pdeploy.runtime.control` declares names the functions here that turn the
``p2pdeploy`` command's arguments into it (``key_of_name``, ``blob_id_of``, ``read_blob_file``)
and print its reply (``show_put``, ``show_status``, ...: rich text for a person, lines a script
reads unchanged; ``status_to_json`` for ``--json``). A ``show_X(reply, arguments, console)``
prints and returns the command's exit status; ``arguments`` are the command's parameters by
name and ``data_dir``. Nothing here talks to a node.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from p2pdeploy.fabric.contribution import ANY, Contribution, ContributionError
from p2pdeploy.fabric.units import format_bandwidth, format_cores, format_cores_number, format_size
from p2pdeploy.overlay.identity import key_id
from p2pdeploy.runtime.address import format_host_port
from p2pdeploy.runtime.snapshot import write_file_atomically

if TYPE_CHECKING:
    from p2pdeploy.fabric.machine import Machine
    from p2pdeploy.runtime.control import (
        BlobGetReply,
        BlobPutReply,
        DetectorStatus,
        GetReply,
        LookupReply,
        PutReply,
        StatusReply,
    )


class Unsendable(Exception):
    """The command's arguments make no request (a file too large, ...): ``message`` is printed
    (rich markup) and the command exits with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- arguments ------------------------------------------------------------------------------


def key_of_name(name: str) -> int:
    """The overlay key of a NAME given on the command line."""
    return key_id(name.encode())


def blob_id_of(text: str) -> int:
    """A blob id given on the command line: the 40 hex digits ``blob put`` printed."""
    cleaned = text.strip().lower().removeprefix("0x")
    if len(cleaned) != 40 or any(ch not in "0123456789abcdef" for ch in cleaned):
        raise ValueError(f"a blob id is 40 hex digits, as `p2pdeploy blob put` prints it (got {text!r})")
    return int(cleaned, 16)


def read_blob_file(path: str | Path, limit_bytes: int) -> bytes:
    """The bytes of FILE for ``blob put``; :class:`Unsendable` (exit status 2) over ``limit_bytes``."""
    source = Path(path)
    size = source.stat().st_size
    if size > limit_bytes:
        raise Unsendable(f"[red]{source} has {format_size(size)}; `blob put` carries at most "
                         f"{format_size(limit_bytes)}[/]", 2)  # fmt: skip
    return source.read_bytes()


# -- replies --------------------------------------------------------------------------------


def show_put(reply: PutReply, arguments: Mapping[str, Any], console: Console) -> int:
    """``stored NAME (key HEX) on N nodes``; exit status 0 when any node stored it."""
    name, key = arguments["name"], reply.key
    if reply.stored == 0:
        reasons = "; ".join(sorted(set(reply.refusals))) or "no node answered"
        console.print(f"[red]{name} was stored on no node[/] (key {key:040x}): {reasons}")
        return 1
    console.print(f"stored {name} (key {key:040x}) on {count(reply.stored, 'node')}")
    return 0


def show_get(reply: GetReply, arguments: Mapping[str, Any], console: Console) -> int:
    """The value alone (the bytes, then a newline); exit status 1 when none is found."""
    if reply.item is None:
        Console(stderr=True, highlight=False).print(f"{arguments['name']} not found (key {reply.key:040x})")
        return 1
    out = sys.stdout.buffer
    out.write(reply.item.value + b"\n")
    out.flush()
    return 0


def show_lookup(reply: LookupReply, arguments: Mapping[str, Any], console: Console) -> int:
    """One ``HEX HOST:PORT`` line per contact, closest first; exit status 1 when none answered."""
    key = reply.key
    console.print(
        f"[dim]{count(len(reply.contacts), 'node')} closest to {arguments['name']} (key {key:040x}), closest first, "
        f"{count(reply.hops, 'hop')}, {count(reply.requests, 'request')}:[/]"
    )
    for contact in reply.contacts:
        address = contact.address
        where = format_host_port(address) if isinstance(address, tuple) else str(address)
        distance_bits = (contact.node_id ^ key).bit_length()
        console.print(f"{contact.node_id:040x} {where} [dim](distance < 2^{distance_bits})[/]")
    return 0 if reply.contacts else 1


def show_blob_put(reply: BlobPutReply, arguments: Mapping[str, Any], console: Console) -> int:
    """What was stored, then ``blob HEX``; exit status 1 when not stored."""
    source = Path(arguments["path"])
    if reply.reason:
        console.print(f"[red]{source} was not stored[/]: {reply.reason}")
        return 1
    console.print(f"stored {source.name} ({format_size(reply.size)}, {count(reply.chunks, 'chunk')}, "
                  f"{reply.replicas} {'copy' if reply.replicas == 1 else 'copies'} of each)")
    console.print(f"blob {reply.blob_id:040x}")
    return 0


def show_blob_get(reply: BlobGetReply, arguments: Mapping[str, Any], console: Console) -> int:
    """The blob to ``arguments["out"]``, or to standard output; exit status 1 when not fetched."""
    key, out = reply.blob_id, arguments["out"]
    if reply.data is None:
        Console(stderr=True, highlight=False).print(f"blob {key:040x} not fetched: {reply.reason or 'not found'}")
        return 1
    if out is None:
        sys.stdout.buffer.write(reply.data)
        sys.stdout.buffer.flush()
    else:
        write_file_atomically(Path(out), reply.data, mode=0o644)
        console.print(f"fetched blob {key:040x} ({format_size(len(reply.data))}) to {out}")
    return 0


def status_to_json(status: StatusReply) -> dict[str, Any]:
    """``status`` as plain JSON values: node ids as 40 hex digits, bytes as hex."""

    def plain(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {name: plain(item, name) for name, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        if isinstance(value, bytes):
            return value.hex()
        if key == "node_id" and isinstance(value, int):
            return f"{value:040x}"
        return value

    return plain(asdict(status))


def show_status(status: StatusReply, arguments: Mapping[str, Any], console: Console) -> int:
    """The node's id, address, routing table, store, failure detector and counters as tables."""
    table = Table(title=f"node of {status.data_dir or arguments['data_dir']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("node id", f"{status.node_id:040x}")
    table.add_row("address", format_host_port((status.host, status.port)))
    table.add_row("uptime", f"{status.uptime_s:.1f} s")
    table.add_row("contacts", f"{status.contacts} in {status.buckets} buckets ({status.restored_contacts} restored)")
    table.add_row("stored items", str(status.stored_items))
    table.add_row("published items", str(status.published_items))
    if status.persistence is not None:
        held = status.persistence
        table.add_row("persistence", f"{count(held.get('chunks', 0), 'chunk')} "
                      f"({format_size(held.get('bytes_used', 0))} of {format_size(held.get('capacity_bytes', 0))}), "
                      f"{count(held.get('records', 0), 'record')}")
    if status.state_url:
        table.add_row("state API", status.state_url)
    console.print(table)
    if status.contribution is not None:
        try:
            contribution = Contribution.from_table(status.contribution, source="the node's status")
        except ContributionError:
            contribution = None
        if contribution is not None:
            replicas_dir = Path(status.replicas_dir) if status.replicas_dir else None
            console.print(contribution_table(contribution, None, replicas_dir))
        replicas = Table(title=f"replicas ({len(status.replicas)})", title_justify="left")
        for column in ("replica", "state", "port", "run", "restarts", "disk", "started by"):
            replicas.add_column(column)
        for replica in status.replicas:
            state = f"{replica.state}: {replica.reason}" if replica.reason else replica.state
            replicas.add_row(
                replica.replica_id, state, "" if replica.port is None else str(replica.port), str(replica.run),
                str(replica.restarts), "" if replica.disk_bytes is None else format_size(replica.disk_bytes),
                f"{replica.requested_by.hex()[:16]}…" if replica.requested_by else "",
            )  # fmt: skip
        console.print(replicas)
    if status.detector is not None:
        console.print(detector_table(status.detector))
    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name in sorted(status.counters):
        counters.add_row(name, str(status.counters[name]))
    console.print(counters)
    return 0


def detector_table(detector: DetectorStatus) -> Table:
    """The failure detector's view: whom it watches, suspects and holds dead, its health and counters."""
    counters = detector.counters
    table = Table(
        title=f"failure detector: {count(detector.watched, 'peer')} watched, {len(detector.suspects)} suspect, "
        f"{len(detector.dead)} dead",
        title_justify="left",
    )
    for column in ("peer", "state", "incarnation", "since"):
        table.add_column(column)
    for peer in [*detector.suspects, *detector.dead]:
        when = datetime.datetime.fromtimestamp(peer.since_unix_s).strftime("%H:%M:%S")
        table.add_row(f"{peer.node_id:040x}", peer.state, str(peer.incarnation), f"{when} ({peer.for_s:.1f} s ago)")
    table.caption = f"local health {detector.health} (0 is healthy), incarnation {detector.incarnation}; " + ", ".join(
        f"{name} {counters[name]}" for name in sorted(counters)
    )
    table.caption_justify = "left"
    return table


def contribution_table(contribution: Contribution, machine: Machine | None, replicas_dir: Path | None) -> Table:
    """What a node offers; with ``machine``, beside what the machine has."""
    table = Table(title="contribution (what this node offers)", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("offered", overflow="fold")
    if machine is not None:
        table.add_column("this machine", style="dim")
    c = contribution

    def row(what: str, offered: str, has: str = "") -> None:
        table.add_row(what, offered, *([has] if machine is not None else []))

    row("cpu", format_cores(c.cpu_cores), f"of {format_cores_number(machine.cores)}" if machine else "")
    row("memory", format_size(c.memory_bytes), f"of {format_size(machine.memory_total_bytes)}" if machine else "")
    row("disk", format_size(c.disk_bytes), f"of {format_size(machine.disk_free_bytes)} free" if machine else "")
    row("bandwidth", "not metered" if c.bandwidth_bps is None else format_bandwidth(c.bandwidth_bps))
    row("services", f"at most {c.max_services}")
    if c.trusted_keys == ANY:
        trusts = "any key (an open community)"
    elif not c.trusted_keys:
        trusts = "nobody but this node's own key"
    else:
        trusts = ", ".join(f"{key.hex()[:16]}…" for key in sorted(c.trusted_keys))
    row("trusts", trusts)
    row("allowed tags", "any" if c.allowed_tags == ANY else ", ".join(sorted(c.allowed_tags)) or "none")
    row("tags", ", ".join(sorted(c.tags)) or "none")
    if c.owner:
        row("owner", c.owner)
    row("files of stopped replicas", f"kept {c.retention_s / 3600:g} h (their disk stays reserved)")
    if replicas_dir is not None:
        row("replicas in", str(replicas_dir))
    return table
