"""The service commands: ``deploy``, ``scale``, ``undeploy``, ``status SERVICE``, ``ls`` and ``events``.

Each talks to the running ``join`` node of a data directory through its control socket
(:mod:`~p2pdeploy.runtime.control`): the node's deployment layer writes the service's record
(only the owner's key can: the node's key is the data directory's) and asks the service's
manager what it wants and sees. ``deploy`` and ``undeploy`` then ask for the status every
``POLL_S`` until the replicas run (or have stopped), with a progress display.

Lines a script reads are plain and stable: ``deployed NAME@OWNER version V``, ``undeployed
NAME@OWNER version V``, ``scaled NAME@OWNER version V``, ``REPLICA on NODE12 (HOST:PORT):
STATE[: REASON]``, ``NAME@OWNER: running R of D`` (``ls``); with ``--json`` the last line is
one JSON object (node ids and keys in hex; ``events`` prints one object per decision). A
refusal (a non-owner's change, an impossible requirement) goes to standard error, or with
``--json`` is the object ``{"ok": false, "error": REASON}``; the exit status is then 1.

``events --follow`` asks for the status every ``FOLLOW_S`` and prints the decisions it has
not printed yet: the control socket answers one request with one reply, so it cannot carry a
subscription to the service's pub/sub topic (``RuntimeNode.service_events`` can, in-process).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from p2pdeploy.collective.deployment_messages import PlacedReplica, ServiceId, ServiceReport
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.runtime.address import format_host_port
from p2pdeploy.runtime.commands import CONTROL_TIMEOUT_S, _stderr, load_bundle
from p2pdeploy.runtime.control import (
    ControlClient,
    ControlRequestRefused,
    DeployReply,
    DeployRequest,
    ScaleRequest,
    ServicesReply,
    ServicesRequest,
    ServiceStatusReply,
    ServiceStatusRequest,
    UndeployRequest,
    control_request,
    open_control,
)

#: Seconds between two status requests while ``deploy`` or ``undeploy`` waits.
POLL_S = 0.5
#: Seconds between two status requests of ``events --follow``.
FOLLOW_S = 1.0
#: Replica states that still run, or will (``stopping``: the manager has asked it to stop).
STILL_RUNNING = frozenset({"requested", "fetching", "installing", "starting", "running", "stopping"})
#: Exit status of a command whose change was refused, or whose wait ran out.
EXIT_FAILED = 1
#: The services ``ls`` asks the status of at once.
LS_CONCURRENCY = 8


# -- what the replies say -------------------------------------------------------------------


def running_healthy(report: ServiceReport) -> list[PlacedReplica]:
    """The replicas that run and pass their health check."""
    return [r for r in report.replicas if r.state == "running" and r.healthy]


def short_node(contact: Contact | None) -> str:
    return "nobody" if contact is None else f"{contact.node_id:040x}"[:12]


def where(contact: Contact) -> str:
    address = contact.address
    if isinstance(address, tuple) and len(address) == 2:
        return f"{short_node(contact)} ({format_host_port((str(address[0]), int(address[1])))})"
    return short_node(contact)


def replica_line(replica: PlacedReplica) -> str:
    """``REPLICA on NODE12 (HOST:PORT): STATE[: REASON]`` (``unhealthy`` when it runs but fails its check)."""
    state = replica.state if replica.healthy or replica.state != "running" else "running, unhealthy"
    line = f"{replica.replica_id} on {where(replica.host)}: {state}"
    return f"{line}: {replica.reason}" if replica.reason else line


def contact_json(contact: Contact | None) -> dict[str, Any] | None:
    if contact is None:
        return None
    address = contact.address
    host, port = (address[0], address[1]) if isinstance(address, tuple) else (str(address), None)
    return {"node_id": f"{contact.node_id:040x}", "host": host, "port": port}


_DECISION_AT = re.compile(r"^(-?[0-9]+(?:\.[0-9]+)?) (.*)$", re.S)


def decision_json(service: str, text: str) -> dict[str, Any]:
    """A decision of ``status`` (``AT_S DECISION[ REPLICA][ on NODE12][: REASON]``) as JSON."""
    match = _DECISION_AT.match(text)
    at_s, what = (float(match.group(1)), match.group(2)) if match else (None, text)
    return {"service": service, "at_s": at_s, "decision": what.split(" ", 1)[0].rstrip(":"), "text": what}


def status_json(reply: ServiceStatusReply) -> dict[str, Any]:
    """A service's status as one JSON object (node ids in hex)."""
    report = reply.report
    if report is None:
        return {"service": reply.service, "found": False, "reason": reply.reason}
    return {
        "service": reply.service,
        "found": True,
        "manager": contact_json(report.manager),
        "version": report.version,
        "desired": report.desired,
        "desired_reason": report.desired_reason,
        "running": len(running_healthy(report)),
        "pending": report.pending,
        "replicas": [
            {"replica_id": r.replica_id, "node": contact_json(r.host), "state": r.state, "reason": r.reason,
             "healthy": r.healthy, "since_s": r.since_s}
            for r in report.replicas
        ],
        "decisions": [decision_json(reply.service, text) for text in report.decisions],
    }


def _print_json(console: Console, value: dict[str, Any]) -> None:
    console.print(json.dumps(value), markup=False, highlight=False, soft_wrap=True)


def _refused(console: Console, what: str, reason: str, as_json: bool, **extra: Any) -> int:
    if as_json:
        _print_json(console, {"ok": False, "error": reason, **extra})
    else:
        _stderr().print(f"{what}: {reason}", markup=False)
    return EXIT_FAILED

async def _changed(client: Any, console: Console, reply: DeployReply, action: str, done: str, wait: bool,
                   timeout_s: float, as_json: bool, extra: dict[str, Any]) -> int:
    """After a deploy or an undeploy: its refusal, or its line and, unless ``wait`` is False, the
    wait until as many replicas run healthy as wanted (a deploy) or none runs (an undeploy)."""
    if not reply.ok:
        return _refused(console, f"{action} of {_short(reply.service)} refused", reply.reason, as_json,
                        service=reply.service)
    if not as_json:
        console.print(f"{done} {reply.service} version {reply.version}", markup=False)
    result: dict[str, Any] = {"ok": True, "service": reply.service, "version": reply.version, **extra}
    if not wait:
        if as_json:
            _print_json(console, result)
        return 0
    watch = _Watch(console, quiet=as_json)
    until, state = (_all_running, "running") if action == "deploy" else (_none_running, "stopped")
    reached = await _wait(client, reply.service, until, timeout_s, watch, _short(reply.service))
    return _after_wait(console, watch, result, reached, timeout_s, as_json, state)



def _short(service: str) -> str:
    try:
        return ServiceId.parse(service).short()
    except ValueError:
        return service


# -- waiting for replicas -------------------------------------------------------------------


@dataclass
class _Watch:
    """What a wait has printed so far: each replica's last state, so a change prints once."""

    console: Console
    quiet: bool
    seen: dict[str, str] = field(default_factory=dict)
    last: ServiceStatusReply | None = None

    def show(self, reply: ServiceStatusReply) -> None:
        self.last = reply
        if reply.report is None or self.quiet:
            return
        for replica in reply.report.replicas:
            line = replica_line(replica)
            if self.seen.get(replica.replica_id) != line:
                self.seen[replica.replica_id] = line
                self.console.print(line, markup=False)


async def _wait(
    client: ControlClient, service: str, done: Any, timeout_s: float, watch: _Watch, label: str
) -> bool:
    """Ask for ``service``'s status every ``POLL_S`` until ``done(report)``; False when ``timeout_s`` ran out."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=watch.console, auto_refresh=False, transient=True,
                        disable=watch.quiet or not watch.console.is_terminal)
    with progress:
        task = progress.add_task(label, total=None)
        with trio.move_on_after(timeout_s):
            while True:
                reply: ServiceStatusReply = await client.request(ServiceStatusRequest(service))
                watch.show(reply)
                report = reply.report
                if report is not None:
                    running = len(running_healthy(report))
                    progress.update(task, total=max(report.desired, running), completed=running,
                                    description=f"{label}: {running} of {report.desired} running")
                    progress.refresh()
                    if done(report):
                        return True
                await trio.sleep(POLL_S)
    return False


def _missing(reply: ServiceStatusReply | None) -> str:
    """What a wait that ran out still lacked, in words."""
    if reply is None or reply.report is None:
        reason = reply.reason if reply is not None and reply.reason else "no member of its group answered"
        return f"no manager reported on the service ({reason})"
    report = reply.report
    running = len(running_healthy(report))
    words = f"{running} of {report.desired} replicas running and healthy"
    if report.pending:
        words += f"; pending: {report.pending}"
    not_running = [replica_line(r) for r in report.replicas if not (r.state == "running" and r.healthy)]
    if not_running:
        words += "; " + "; ".join(not_running)
    return words


# -- the commands ---------------------------------------------------------------------------


async def run_deploy(
    source: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    replicas: int | None = None,
    availability: float | None = None,
    wait: bool = True,
    timeout_s: float = 120.0,
    as_json: bool = False,
) -> int:
    """Deploy a service directory (packed and signed now with the data directory's key) or a
    bundle file through the node of ``data_dir``; unless ``wait`` is False, wait until as many
    replicas run and pass their health check as the manager wants. The exit status."""
    signed, bundle = load_bundle(source, data_dir)
    manifest = bundle.manifest
    if not as_json:
        console.print(f"[dim]bundle {manifest.name} {manifest.version} signed by key {signed.public_key.hex()[:16]}…[/]")
    async with open_control(data_dir) as client:
        try:
            with trio.fail_after(CONTROL_TIMEOUT_S):
                reply: DeployReply = await client.request(
                    DeployRequest.of(signed, replicas=replicas, availability=availability))
        except ControlRequestRefused as exc:
            return _refused(console, f"deploy of {manifest.name} refused", exc.reason, as_json)
        return await _changed(client, console, reply, "deploy", "deployed", wait, timeout_s, as_json,
                              {"bundle_version": manifest.version})


def _all_running(report: ServiceReport) -> bool:
    return report.desired > 0 and len(running_healthy(report)) >= report.desired


def _none_running(report: ServiceReport) -> bool:
    return not any(r.state in STILL_RUNNING for r in report.replicas)


def _after_wait(
    console: Console, watch: _Watch, result: dict[str, Any], ready: bool, timeout_s: float, as_json: bool,
    wanted: str,
) -> int:
    last = watch.last
    if as_json:
        status = status_json(last) if last is not None else {}
        result.update({"ready": ready, "status": status})
        if not ready:
            result["ok"] = False
            result["error"] = f"not {wanted} after {timeout_s:g} s: {_missing(last)}"
        _print_json(console, result)
        return 0 if ready else EXIT_FAILED
    if ready:
        assert last is not None and last.report is not None
        running = len(running_healthy(last.report))
        console.print(f"{_short(result['service'])}: {running} of {last.report.desired} replicas running"
                      if wanted == "running" else f"{_short(result['service'])}: no replica runs", markup=False)
        return 0
    _stderr().print(f"{_short(result['service'])} is not {wanted} after {timeout_s:g} s: {_missing(last)}",
                    markup=False)
    return EXIT_FAILED


async def run_undeploy(
    service: str,
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    wait: bool = True,
    timeout_s: float = 120.0,
    as_json: bool = False,
) -> int:
    """Undeploy ``service`` (only its owner's node may); unless ``wait`` is False, wait until no
    replica runs. The exit status."""
    async with open_control(data_dir) as client:
        try:
            with trio.fail_after(CONTROL_TIMEOUT_S):
                reply: DeployReply = await client.request(UndeployRequest(service))
        except ControlRequestRefused as exc:
            return _refused(console, "undeploy refused", exc.reason, as_json)
        return await _changed(client, console, reply, "undeploy", "undeployed", wait, timeout_s, as_json, {})


async def run_scale(
    service: str,
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    replicas: int | None = None,
    availability: float | None = None,
    as_json: bool = False,
) -> int:
    """Change ``service``'s replica count or availability target (only its owner's node may)."""
    try:
        with trio.fail_after(CONTROL_TIMEOUT_S):
            reply: DeployReply = await control_request(data_dir, ScaleRequest(service, replicas, availability))
    except ControlRequestRefused as exc:
        return _refused(console, "scale refused", exc.reason, as_json)
    if not reply.ok:
        return _refused(console, f"scale of {_short(reply.service)} refused", reply.reason, as_json,
                        service=reply.service)
    target = f"replicas {replicas}" if replicas is not None else f"availability {availability}"
    if as_json:
        _print_json(console, {"ok": True, "service": reply.service, "version": reply.version,
                              "replicas": replicas, "availability": availability})
    else:
        console.print(f"scaled {reply.service} version {reply.version}: {target}", markup=False)
    return 0


async def service_status(data_dir: str | os.PathLike[str], service: str) -> ServiceStatusReply:
    with trio.fail_after(CONTROL_TIMEOUT_S):
        reply: ServiceStatusReply = await control_request(data_dir, ServiceStatusRequest(service))
    return reply


async def run_service_status(
    service: str, data_dir: str | os.PathLike[str], console: Console, *, as_json: bool = False
) -> int:
    """Print what ``service``'s manager wants and sees: the manager, the version, the desired
    count and its reason, each replica's node, state and reason, and the recent decisions.
    Exit status 1 when no member of the service's group answered."""
    try:
        reply = await service_status(data_dir, service)
    except ControlRequestRefused as exc:
        return _refused(console, "status refused", exc.reason, as_json)
    if as_json:
        _print_json(console, status_json(reply))
        return 0 if reply.report is not None else EXIT_FAILED
    report = reply.report
    console.print(f"service {reply.service}", markup=False)
    if report is None:
        _stderr().print(f"no manager reported on {_short(reply.service)}: {reply.reason or 'no answer'}", markup=False)
        return EXIT_FAILED
    console.print(f"manager {where(report.manager) if report.manager is not None else 'nobody'}", markup=False)
    console.print(f"version {report.version}", markup=False)
    reason = f" ({report.desired_reason})" if report.desired_reason else ""
    console.print(f"desired {report.desired}{reason}, running {len(running_healthy(report))}", markup=False)
    if report.pending:
        console.print(f"pending: {report.pending}", markup=False)
    for replica in report.replicas:
        console.print(replica_line(replica), markup=False)
    if report.decisions:
        console.print("recent decisions:")
        for text in report.decisions:
            console.print(f"  {text}", markup=False)
    return 0


async def run_ls(
    data_dir: str | os.PathLike[str], console: Console, *, owner: str | None = None, as_json: bool = False
) -> int:
    """Print the services of this data directory's key (or of ``owner``, 64 hex digits), each
    as ``NAME@OWNER: running R of D`` from its manager's status."""
    owner_key = b""
    if owner is not None:
        try:
            owner_key = bytes.fromhex(owner)
        except ValueError:
            owner_key = b""
        if len(owner_key) != 32:
            raise ValueError(f"--owner is a public key, 64 hex digits as `p2pdeploy key` prints it (got {owner!r})")
    with trio.fail_after(CONTROL_TIMEOUT_S):
        listed: ServicesReply = await control_request(data_dir, ServicesRequest(owner_key))
    services = [str(ServiceId(name, listed.owner)) for name in listed.names]
    statuses: dict[str, ServiceStatusReply] = {}
    limiter = trio.CapacityLimiter(LS_CONCURRENCY)

    async def ask(service: str) -> None:
        async with limiter:
            statuses[service] = await service_status(data_dir, service)

    async with trio.open_nursery() as nursery:
        for service in services:
            nursery.start_soon(ask, service)
    if as_json:
        _print_json(console, {"owner": listed.owner.hex(), "services": [status_json(statuses[s]) for s in services]})
        return 0
    if not services:
        console.print(f"[dim]no services owned by key {listed.owner.hex()[:16]}…[/]")
    for service in services:
        report = statuses[service].report
        if report is None:
            console.print(f"{service}: no manager answered ({statuses[service].reason or 'no answer'})", markup=False)
        else:
            console.print(f"{service}: running {len(running_healthy(report))} of {report.desired}", markup=False)
    return 0


async def run_events(
    service: str | None,
    data_dir: str | os.PathLike[str],
    console: Console,
    *,
    follow: bool = False,
    as_json: bool = False,
) -> int:
    """Print the recent decisions of ``service`` (or of every service of this data directory's
    key); with ``follow`` keep asking every ``FOLLOW_S`` and print new ones until interrupted."""
    if service is not None:
        services: Sequence[str] = [service]
    else:
        with trio.fail_after(CONTROL_TIMEOUT_S):
            listed: ServicesReply = await control_request(data_dir, ServicesRequest())
        services = [str(ServiceId(name, listed.owner)) for name in listed.names]
    printed: set[tuple[str, str]] = set()
    while True:
        for name in services:
            try:
                reply = await service_status(data_dir, name)
            except ControlRequestRefused as exc:
                return _refused(console, "events refused", exc.reason, as_json)
            if reply.report is None:
                continue
            for text in reply.report.decisions:
                if (reply.service, text) in printed:
                    continue
                printed.add((reply.service, text))
                if as_json:
                    _print_json(console, decision_json(reply.service, text))
                else:
                    console.print(f"{_short(reply.service)}: {text}", markup=False)
        if not follow:
            return 0
        await trio.sleep(FOLLOW_S)
