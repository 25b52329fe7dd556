"""The ``p2pdeploy`` command.

Each subcommand parses its options here and hands the work to the driver that owns it:
``join`` and ``ping`` to the trio runtime, ``simulate`` to the simulator; ``put``, ``get``,
``lookup``, ``status`` and the service commands (``deploy``, ``scale``, ``undeploy``, ``status
SERVICE``, ``ls``, ``events``) talk to the running ``join`` node of a data directory through its
control socket. ``key`` and ``bundle`` use the data directory's key; ``replica start|stop|
status|logs`` send requests signed with it to a node, through the running node of the data
directory when there is one, else from an ephemeral node.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from p2pdeploy import __version__


class AbsolutePath(click.Path):
    """A path option or argument, made absolute where it is given: the node and its services
    work from other directories than the shell that started it (a relative ``--data-dir`` gave
    services relative HOME, TMPDIR and data paths)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return os.path.abspath(super().convert(value, param, ctx))


class HostPortType(click.ParamType):
    """``HOST:PORT`` (``[IPV6]:PORT``) as a ``(host, port)`` tuple; a bad value names its option."""

    name = "HOST:PORT"

    def __init__(self, *, allow_port_zero: bool = False) -> None:
        self.allow_port_zero = allow_port_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        from p2pdeploy.runtime.address import parse_host_port

        try:
            return parse_host_port(value, allow_port_zero=self.allow_port_zero)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _PairType(click.ParamType):
    """``KEY=VALUE`` as a ``(key, value)`` tuple; a value that is not names ``example``."""

    example = ""
    #: Whether spaces around the key and the value go.
    strip = False

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, text = value.partition("=")
        if self.strip:
            key, text = key.strip(), text.strip()
        if not sep or not key:
            self.fail(f"{value!r} is not {self.name}, e.g. {self.example}", param, ctx)
        return key, text


class KademliaSettingType(_PairType):
    """``KEY=VALUE`` naming a field of ``KademliaConfig`` (checked when the config is built)."""

    name = "KEY=VALUE"
    example = "replicate_interval_s=60"
    strip = True


def _data_dir_option(what: str) -> Callable[[Any], Any]:
    """The --data-dir option (or $P2PDEPLOY_DATA_DIR) of every command; ``what`` the directory is to it."""
    return click.option(
        "--data-dir",
        type=AbsolutePath(file_okay=False),
        default=None,
        envvar="P2PDEPLOY_DATA_DIR",
        help=f"{what} [default: $P2PDEPLOY_DATA_DIR, else $XDG_DATA_HOME/p2pdeploy, else ~/.local/share/p2pdeploy].",
    )


_node_dir_option = _data_dir_option("The data directory of the node")
_key_dir_option = _data_dir_option("The data directory whose key signs (identity.key, created on first use)")
_requests_dir_option = _data_dir_option(
    "The data directory whose key signs (identity.key, created on first use); when a node runs with it, "
    "the requests go through that node"
)


_verbose_option = click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug) to stderr.")


def _seconds_option(flag: str, name: str, default: float, help: str) -> Callable[[Any], Any]:
    """An option of seconds, more than 0, whose help shows its default."""
    return click.option(
        flag, name, type=click.FloatRange(min=0, min_open=True), default=default, show_default=True, help=help
    )


def _listen_option(help: str) -> Callable[[Any], Any]:
    """--listen HOST:PORT of a node this command runs (port 0: the OS chooses)."""
    return click.option(
        "--listen", type=HostPortType(allow_port_zero=True), default="127.0.0.1:0", show_default=True, help=help
    )


def _configure_logging(verbose: int) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])


def _run_node_command(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a runtime command under trio, turning the errors a user can fix into one-line messages."""
    import trio

    from p2pdeploy.overlay.identity import IdentityError
    from p2pdeploy.runtime.commands import ReplicaCommandError
    from p2pdeploy.runtime.control import ControlError

    try:
        return trio.run(lambda: fn(*args, **kwargs))
    except (IdentityError, ControlError, ReplicaCommandError) as exc:
        raise click.ClickException(str(exc)) from None
    except trio.TooSlowError:
        raise click.ClickException("the node did not answer in time; see its output (`p2pdeploy join -v`)") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"network error: {exc}") from None
    except KeyboardInterrupt:
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pdeploy")
def main() -> None:
    """Deploy services onto a peer-to-peer community of volunteer machines."""


@main.command()
@click.argument("scenario", type=AbsolutePath(exists=True, dir_okay=False))
@click.option("--seed", type=int, default=None, help="Override the scenario's seed.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a scenario field, e.g. --set nodes=200 or --set network.loss=0.01 (repeatable).",
)
@click.option("--out", type=AbsolutePath(file_okay=False), default=None, help="Write results (CSV, JSON lines, resolved scenario) here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object of summary metrics as the last line.")
def simulate(scenario: str, seed: int | None, overrides: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Run a TOML churn scenario in the deterministic simulator."""
    from p2pdeploy.sim.scenario import run_cli

    run_cli(scenario, seed=seed, overrides=overrides, out=out, as_json=as_json)


@main.command()
@_listen_option("Address to listen on, for UDP and TCP alike; port 0 lets the OS choose.")
@click.option(
    "--bootstrap",
    type=HostPortType(),
    multiple=True,
    help="Address of a node already in the community to join through (repeatable). "
    "A restarted node also rejoins through the contacts saved in its data directory.",
)
@_data_dir_option("Where the node keeps its identity, routing table and control socket")
@click.option("--cpu", metavar="CORES|N%", help="Cores services may use in all, e.g. 2 or 0.5, or a share of this machine such as 50% [default: 1].")
@click.option("--memory", metavar="SIZE|N%", help="Memory services may reserve in all, e.g. 512M, 2G or 25% [default: 1G].")
@click.option("--disk", metavar="SIZE|N%", help="Disk services may reserve in all, e.g. 10G or 10% of the free disk [default: 5G].")
@click.option("--bandwidth", metavar="RATE", help="Bandwidth services may reserve in all, e.g. 20Mbit [default: not metered].")
@click.option("--max-services", type=click.IntRange(min=0), default=None, help="Replicas this node runs at once [default: 4].")
@click.option(
    "--trust",
    multiple=True,
    metavar="KEY|any",
    help="Run bundles signed by, and obey requests from, the deployer key KEY (64 hex digits: what "
    "`p2pdeploy key` prints on the deployer's machine); `any` trusts every key, for an open community "
    "(repeatable) [default: nobody but this node's own key].",
)
@click.option("--allow-tag", "allow_tags", multiple=True, metavar="TAG|any", help="Accept only services tagged TAG (repeatable) [default: any].")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag this machine advertises to services' requirements, e.g. ssd or gpu (repeatable).")
@click.option("--owner", default=None, help="The owner's name, for requirements such as `owner != \"alice\"`.")
@click.option("--retention", metavar="DURATION", help="How long a stopped replica's files (its data and logs) stay, "
              "their disk still reserved, e.g. 24h, 30m or 7d [default: 24h].")
@click.option(
    "--config",
    "config_file",
    type=AbsolutePath(exists=True, dir_okay=False),
    default=None,
    help="A TOML file whose [contribution] section sets the same (cpu, memory, disk, bandwidth, "
    "max_services, trusted_keys, allowed_tags, tags, owner, retention); options given here win "
    "[default: DATA_DIR/config.toml when it exists].",
)
@click.option(
    "--replicas-dir",
    type=AbsolutePath(file_okay=False),
    default=None,
    help="Where replicas' files and logs go [default: DATA_DIR/replicas]. A node run as root runs "
    "each service as a uid of its own, which must be able to enter every directory on the way: one under /root cannot be.",
)
@click.option(
    "--kademlia",
    "kademlia_settings",
    type=KademliaSettingType(),
    multiple=True,
    envvar="P2PDEPLOY_KADEMLIA",
    help="Advanced: set a Kademlia parameter, e.g. --kademlia k=8 --kademlia replicate_interval_s=60 "
    "(repeatable; any field of p2pdeploy.overlay.kademlia.KademliaConfig; "
    "$P2PDEPLOY_KADEMLIA holds the same, separated by spaces).",
)
@_seconds_option(
    "--snapshot-interval", "snapshot_interval_s", 60.0,
    "Advanced: seconds between saves of the routing table to the data directory.",
)  # fmt: skip
@_verbose_option
def join(
    listen: tuple[str, int],
    bootstrap: tuple[tuple[str, int], ...],
    data_dir: str | None,
    cpu: str | None,
    memory: str | None,
    disk: str | None,
    bandwidth: str | None,
    max_services: int | None,
    trust: tuple[str, ...],
    allow_tags: tuple[str, ...],
    tags: tuple[str, ...],
    owner: str | None,
    retention: str | None,
    config_file: str | None,
    replicas_dir: str | None,
    kademlia_settings: tuple[tuple[str, str], ...],
    snapshot_interval_s: float,
    verbose: int,
) -> None:
    """Run a node in the foreground, contributing this machine, until SIGINT or SIGTERM.

    Creates the node's identity in the data directory on first start, prints its id, its public
    key and `listening on HOST:PORT`, joins the overlay through the --bootstrap nodes (or the
    contacts it saved last time), prints what it contributes and reports peers and replicas as
    they come. `p2pdeploy put/get/lookup/status/replica --data-dir DIR` act through its control
    socket, DIR/control.sock.

    \b
    What a volunteer contributes by default (conservative, never more than the machine has):
      1 core, 1 GiB of memory, 5 GiB of disk, bandwidth not metered, at most 4 services,
      services with any tags, and it trusts NO deployer: only bundles and requests signed
      by this node's own key run here until you add --trust KEY (or --trust any).

    Services run as confined processes (rlimits, cgroups where writable; each as a uid of its own
    when the node runs as root) and each reserves what its manifest asks; a request that does not fit
    is refused with the reason. On SIGINT or SIGTERM the node first stops its replicas (TERM,
    then KILL after their grace period; a second signal kills them at once).
    """
    from pathlib import Path

    from p2pdeploy.fabric.contribution import ContributionError
    from p2pdeploy.runtime.commands import (
        CONFIG_FILE,
        ContributionOptionError,
        contribution_options,
        default_data_dir,
        join_contribution,
        kademlia_config,
        make_console,
        run_join,
    )
    from p2pdeploy.runtime.executor import RealExecutorConfig
    from p2pdeploy.runtime.node import RuntimeConfig
    from p2pdeploy.runtime.probe import probe_machine

    directory = Path(data_dir) if data_dir else default_data_dir()
    options = contribution_options(
        cpu=cpu, memory=memory, disk=disk, bandwidth=bandwidth, max_services=max_services,
        trust=trust, allow_tags=allow_tags, tags=tags, owner=owner, retention=retention,
    )  # fmt: skip
    config_path = Path(config_file) if config_file else None
    if config_path is None and (directory / CONFIG_FILE).is_file():
        config_path = directory / CONFIG_FILE
    machine = probe_machine(replicas_dir or directory)
    try:
        contribution, _ = join_contribution(options, config_path, machine)
    except ContributionOptionError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{exc.option}'") from None
    except ContributionError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        config = RuntimeConfig(
            kademlia=kademlia_config(kademlia_settings),
            snapshot_interval_s=snapshot_interval_s,
            executor=RealExecutorConfig(directory, replicas_dir=Path(replicas_dir) if replicas_dir else None),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--kademlia'") from None
    _configure_logging(verbose)
    _run_node_command(run_join, listen, list(bootstrap), directory, make_console(), config, contribution)


def _data_dir_or_default(data_dir: str | None) -> str:
    from p2pdeploy.runtime.commands import default_data_dir

    return data_dir or str(default_data_dir())


def _command(
    group: click.Group, name: str, fn: Any, run: Callable[..., None], shared: list[Callable[[Any], Any]]
) -> click.Command:
    """``group``'s command ``name``: ``fn``'s help and parameters, then the ``shared`` options in
    that order, all passed to ``run``."""
    run.__doc__ = fn.__doc__
    for option in reversed(shared):  # click lists a function's parameters last applied first
        run = option(run)
    run.__click_params__.extend(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    return group.command(name)(run)


def _node_command(group: click.Group, name: str, *, json_help: str | None = None) -> Callable[[Any], click.Command]:
    """A command of ``group`` that sends one control request to the running node of --data-dir.

    The request is the one :data:`p2pdeploy.runtime.control.CONTROL_COMMANDS` declares for the
    command (``blob put`` for ``name="put"`` under ``blob``): the decorated function gives only
    its help and its parameters, which become the request's arguments by name. Adds --data-dir
    (last) and, with ``json_help``, --json; the exit status is the command's.
    """

    def build(fn: Any) -> click.Command:
        words = name if group is main else f"{group.name} {name}"

        def send(data_dir: str | None, as_json: bool = False, **arguments: Any) -> None:
            from p2pdeploy.runtime.commands import make_console, run_control_command

            directory = _data_dir_or_default(data_dir)
            sys.exit(_run_node_command(run_control_command, words, arguments, directory, make_console(), as_json=as_json))

        shared = [_node_dir_option]
        if json_help is not None:
            shared.append(click.option("--json", "as_json", is_flag=True, help=json_help))
        return _command(group, name, fn, send, shared)

    return build


def _value_bytes(ctx: click.Context, param: click.Parameter, value: str) -> bytes:
    """``put``'s VALUE as its UTF-8 bytes, or standard input when it is ``-``."""
    return sys.stdin.buffer.read() if value == "-" else value.encode()


@_node_command(main, "put")
@click.argument("name")
@click.argument("value", callback=_value_bytes)
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the value lives unless republished [default: the overlay's, 24 h]; "
    "the node republishes what it stored while it runs.",
)
def put() -> None:
    """Store VALUE under NAME in the overlay, through the running node of the data directory.

    NAME is hashed to its key (the first 160 bits of SHA-256 of its UTF-8 bytes); VALUE is
    stored as its UTF-8 bytes, or read from standard input when it is `-`.
    """


@_node_command(main, "get")
@click.argument("name")
def get() -> None:
    """Print the value stored under NAME (then a newline); exit status 1 when no node holds one."""


@_node_command(main, "lookup")
@click.argument("name")
def lookup() -> None:
    """Print the nodes closest to NAME's key, closest first: `HEX HOST:PORT` per line."""


@main.group()
def blob() -> None:
    """Store and fetch files as content-addressed blobs, through the running node.

    A blob is split into chunks (256 KiB), each named by its SHA-256 and kept on the nodes
    closest to that name (3 by default), which repair it when holders leave or a copy on disk
    is damaged; every read is checked against the hashes. Each chunk carries a pin signed by
    the node's key for 7 days: nodes whose owners trust that key keep and repair it; the others
    keep it only within a small quota, unrepaired, and drop it an hour after. Put a blob again
    to renew its pins.
    """


@_node_command(blob, "put")
@click.argument("path", metavar="FILE", type=AbsolutePath(exists=True, dir_okay=False))
@click.option("--replicas", type=click.IntRange(min=1, max=20), default=None,
              help="Copies of each chunk [default: 3; nodes keep at most 5 by default].")
def blob_put() -> None:
    """Store FILE (up to 64 MiB); print its blob id (40 hex digits)."""


def _blob_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``blob get``'s ID, checked before the node is asked."""
    from p2pdeploy.runtime.control_views import blob_id_of

    try:
        blob_id_of(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None
    return value


@_node_command(blob, "get")
@click.argument("blob_id", metavar="ID", callback=_blob_id)
@click.option("-o", "--out", type=AbsolutePath(dir_okay=False, writable=True), default=None,
              help="Write the blob to this file [default: standard output].")
def blob_get() -> None:
    """Fetch the blob ID, every chunk checked against its hash; exit status 1 when not found."""


@main.command()
@click.argument("service", required=False, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object (node ids in hex).")
@_node_dir_option
def status(service: str | None, as_json: bool, data_dir: str | None) -> None:
    """Show the running node, or with SERVICE a service.

    Without SERVICE: the node's id, address, routing table, stored items, failure detector
    (peers watched, suspected and declared dead, local health) and counters.

    With SERVICE (NAME, a service of the data directory's key, or NAME@OWNER): its manager,
    version, desired replica count and why, each replica's node, state and reason, and the
    manager's recent decisions. Exit status 1 when no node of the service's group answers.
    """
    from p2pdeploy.runtime.commands import make_console, run_control_command
    from p2pdeploy.runtime.service_commands import run_service_status

    directory = _data_dir_or_default(data_dir)
    if service is None:
        sys.exit(_run_node_command(run_control_command, "status", {}, directory, make_console(), as_json=as_json))
    sys.exit(_run_node_command(run_service_status, service, directory, make_console(), as_json=as_json))


_owner_dir_option = _data_dir_option(
    "The data directory of the running node that acts: its key (identity.key) signs a DIR and owns the service"
)
_service_json_option = click.option("--json", "as_json", is_flag=True,
                                    help="Print one JSON object as the last line (node ids and keys in hex).")
_replicas_option = click.option("--replicas", type=click.IntRange(min=1, max=64), default=None,
                                help="Run this many replicas (overrides the manifest's placement).")
_availability_option = click.option(
    "--availability", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
    help="Run as many replicas as it takes, by the nodes' measured uptime, to keep the service up this "
    "fraction of the time, e.g. 0.999 (overrides the manifest's placement).")


def _one_of_replicas_or_availability(replicas: int | None, availability: float | None, *, required: bool) -> None:
    if replicas is not None and availability is not None:
        raise click.UsageError("give --replicas or --availability, not both")
    if required and replicas is None and availability is None:
        raise click.UsageError("give --replicas N or --availability A")


@main.command()
@click.argument("source", metavar="DIR|BUNDLE", type=AbsolutePath(exists=True))
@_replicas_option
@_availability_option
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait, with a progress display, until the replicas run and pass their health check.")
@_seconds_option("--timeout", "timeout_s", 120.0, "Seconds to wait for the replicas; exit status 1 after.")
@_service_json_option
@_owner_dir_option
def deploy(source: str, replicas: int | None, availability: float | None, wait: bool, timeout_s: float,
           as_json: bool, data_dir: str | None) -> None:
    """Deploy a service: a directory (packed and signed now with the data directory's key) or a
    bundle file from `p2pdeploy bundle`, through the running node of the data directory.

    The service is NAME@KEY: the manifest's name, owned by the node's key; deploying it again
    updates it. The community keeps it running: the nodes closest to the service's record
    manage it, place its replicas on nodes that trust the bundle's key and have room, and
    replace those that fail. Prints `deployed NAME@OWNER version V`, then each replica's node
    and state until as many run as the manager wants (exit status 1 after --timeout, saying
    what is missing).
    """
    from p2pdeploy.runtime.commands import make_console
    from p2pdeploy.runtime.service_commands import run_deploy

    _one_of_replicas_or_availability(replicas, availability, required=False)
    sys.exit(_run_node_command(run_deploy, source, _data_dir_or_default(data_dir), make_console(), replicas=replicas,
                               availability=availability, wait=wait, timeout_s=timeout_s, as_json=as_json))


@main.command()
@click.argument("service")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until no replica runs.")
@_seconds_option("--timeout", "timeout_s", 120.0, "Seconds to wait; exit status 1 after.")
@_service_json_option
@_owner_dir_option
def undeploy(service: str, wait: bool, timeout_s: float, as_json: bool, data_dir: str | None) -> None:
    """Stop every replica of SERVICE (NAME of the data directory's key, or NAME@OWNER); only
    the owner's key may. The name stays the owner's."""
    from p2pdeploy.runtime.commands import make_console
    from p2pdeploy.runtime.service_commands import run_undeploy

    sys.exit(_run_node_command(run_undeploy, service, _data_dir_or_default(data_dir), make_console(), wait=wait,
                               timeout_s=timeout_s, as_json=as_json))


@main.command()
@click.argument("service")
@_replicas_option
@_availability_option
@_service_json_option
@_owner_dir_option
def scale(service: str, replicas: int | None, availability: float | None, as_json: bool, data_dir: str | None) -> None:
    """Change SERVICE's replica count (--replicas) or availability target (--availability); only
    the owner's key may."""
    from p2pdeploy.runtime.commands import make_console
    from p2pdeploy.runtime.service_commands import run_scale

    _one_of_replicas_or_availability(replicas, availability, required=True)
    sys.exit(_run_node_command(run_scale, service, _data_dir_or_default(data_dir), make_console(), replicas=replicas,
                               availability=availability, as_json=as_json))


@main.command("ls")
@click.option("--owner", default=None, metavar="KEY", help="List the services of this key (64 hex digits) "
              "[default: the data directory's].")
@_service_json_option
@_node_dir_option
def ls(owner: str | None, as_json: bool, data_dir: str | None) -> None:
    """List the services of the data directory's key (or --owner's), each as
    `NAME@OWNER: running R of D` from its manager's status."""
    from p2pdeploy.runtime.commands import make_console
    from p2pdeploy.runtime.service_commands import run_ls

    sys.exit(_run_node_command(run_ls, _data_dir_or_default(data_dir), make_console(), owner=owner, as_json=as_json))


@main.command()
@click.argument("service", required=False, default=None)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new decisions (asked every second) until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per decision.")
@_node_dir_option
def events(service: str | None, follow: bool, as_json: bool, data_dir: str | None) -> None:
    """Print the recent decisions of SERVICE's manager (placed, replaced, surplus stopped,
    pending, ...), or of every service of the data directory's key, with their reasons."""
    from p2pdeploy.runtime.commands import make_console
    from p2pdeploy.runtime.service_commands import run_events

    sys.exit(_run_node_command(run_events, service, _data_dir_or_default(data_dir), make_console(), follow=follow,
                               as_json=as_json))


@main.command()
@click.argument("target", metavar="HOST:PORT", type=HostPortType())
@click.option("-c", "--count", type=click.IntRange(min=1), default=4, show_default=True, help="Pings to send.")
@click.option(
    "--payload-bytes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Payload echoed back; a ping over 1,200 encoded bytes goes by TCP instead of UDP.",
)
@_listen_option("Address of the ephemeral node that sends the pings.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0), default=0.2, show_default=True, help="Seconds between pings.")
@_seconds_option("--timeout", "timeout_s", 2.0, "Count a ping as lost when no pong came within this many seconds.")
@_verbose_option
def ping(
    target: tuple[str, int],
    count: int,
    payload_bytes: int,
    listen: tuple[str, int],
    interval_s: float,
    timeout_s: float | None,
    verbose: int,
) -> None:
    """Ping the node at HOST:PORT from an ephemeral node and print each round-trip time and the peer's id."""
    from p2pdeploy.runtime.commands import make_console, run_ping

    _configure_logging(verbose)
    status = _run_node_command(
        run_ping,
        target,
        count=count,
        payload_bytes=payload_bytes,
        listen=listen,
        interval_s=interval_s,
        timeout_s=timeout_s,
        console=make_console(),
    )
    sys.exit(status)


class BindingType(_PairType):
    """``NAME=VALUE``: an environment variable given to the replica (``--bind DATABASE_URL=...``)."""

    name = "NAME=VALUE"
    example = "GREETING=hi"


@main.command()
@_key_dir_option
def key(data_dir: str | None) -> None:
    """Print the public key of the data directory (created on first use), alone on a line.

    It is what signs your bundles and requests: give it to the volunteers whose nodes should
    run your services (`p2pdeploy join --trust KEY`).
    """
    from p2pdeploy.runtime.commands import make_console, run_key

    sys.exit(_run_sync_command(run_key, _data_dir_or_default(data_dir), make_console()))


@main.command()
@click.argument("directory", type=AbsolutePath(exists=True, file_okay=False))
@click.option(
    "--out",
    type=AbsolutePath(dir_okay=False),
    default=None,
    help="Where to write the bundle; its signature goes to OUT.sig [default: NAME-VERSION.tar.gz here].",
)
@_key_dir_option
def bundle(directory: str, out: str | None, data_dir: str | None) -> None:
    """Pack a service DIRECTORY (manifest.toml and its files) into a bundle signed with your key.

    The bundle is a plain deterministic .tar.gz; the signature (Ed25519, by the key of the data
    directory) is a small text file beside it. `p2pdeploy replica start FILE` sends both.
    """
    from p2pdeploy.runtime.commands import make_console, run_bundle

    sys.exit(_run_sync_command(run_bundle, directory, out, _data_dir_or_default(data_dir), make_console()))


def _run_sync_command(fn: Any, *args: Any) -> Any:
    from p2pdeploy.overlay.identity import IdentityError

    try:
        return fn(*args)
    except (IdentityError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


@main.group()
def replica() -> None:
    """Start, stop and watch a replica on one node, with requests signed by your key.

    \b
    Requests are signed with the key of --data-dir and go out through the node running with
    that data directory when there is one (its control socket), else from an ephemeral node.
    The node checks the signature, that it trusts the key (`join --trust`), the bundle's
    signature, the service's requirements and that it fits the owner's contribution; a refusal
    is printed on standard error as `refused by node ID at HOST:PORT: CHECK: REASON`.
    Exit status: 0 done, 1 refused by the node (or the replica failed), 2 usage error.
    """


_node_option = click.option(
    "--node", "target", type=HostPortType(), required=True, help="The node's address (its `listening on` line)."
)
_replica_listen_option = click.option(
    "--listen",
    type=HostPortType(allow_port_zero=True),
    default=None,
    help="Advanced: where the ephemeral node listens for answers [default: 127.0.0.1:0 for a loopback "
    "node, else 0.0.0.0:0].",
)


def _replica_command(name: str, run: str, *, console: bool = True) -> Callable[[Any], click.Command]:
    """A ``replica`` command that calls ``p2pdeploy.runtime.commands.<run>``.

    The decorated function gives the help and the command's own parameters, passed to ``run``
    by name with ``target``, ``listen``, ``data_dir`` (and, with ``console``, a console); the
    shared options --node, --data-dir, --listen and -v follow them. The exit status is ``run``'s.
    """

    def build(fn: Any) -> click.Command:
        def send(verbose: int, data_dir: str | None, **arguments: Any) -> None:
            from p2pdeploy.runtime import commands

            _configure_logging(verbose)
            if console:
                arguments["console"] = commands.make_console()
            sys.exit(_run_node_command(getattr(commands, run), data_dir=_data_dir_or_default(data_dir), **arguments))

        return _command(replica, name, fn, send, [_node_option, _requests_dir_option, _replica_listen_option, _verbose_option])

    return build


_wait_option = click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until the replica is running (start) or stopped (stop), asking for its status.",
)
_timeout_option = _seconds_option("--timeout", "timeout_s", 60.0, "Seconds to wait with --wait.")


@_replica_command("start", "run_replica_start")
@click.argument("source", metavar="DIR|BUNDLE", type=AbsolutePath(exists=True))
@click.option("--id", "replica_id", default=None, help="The replica's id on the node [default: NAME-1].")
@click.option("--bind", "bindings", type=BindingType(), multiple=True, callback=lambda ctx, param, pairs: dict(pairs),
              help="An environment variable for the service, NAME=VALUE (repeatable).")
@click.option("--by-blob", is_flag=True, help="Store the bundle as a blob through the running node of the data "
              "directory and start by its id: the node fetches it from the nodes that hold it and caches it.")
@_wait_option
@_timeout_option
def replica_start() -> None:
    """Run a service on the node: a service directory (packed and signed now) or a bundle file
    from `p2pdeploy bundle` (with its .sig beside it)."""


@_replica_command("stop", "run_replica_stop")
@click.argument("replica_id", metavar="ID")
@_wait_option
@_timeout_option
def replica_stop() -> None:
    """Stop replica ID on the node (TERM, then KILL after its grace period); its logs stay readable."""


@_replica_command("status", "run_replica_status")
@click.argument("replica_id", metavar="ID")
def replica_status() -> None:
    """Print replica ID's state on the node, then its run, restarts, port and health."""


@_replica_command("logs", "run_replica_logs", console=False)
@click.argument("replica_id", metavar="ID")
@click.option(
    "--bytes", "max_bytes", type=click.IntRange(min=1), default=16384, show_default=True,
    help="How much of the end of the logs (the node sends at most 64 KiB).",
)  # fmt: skip
def replica_logs() -> None:
    """Print the end of replica ID's logs (its stdout and stderr) as the node kept them."""


if __name__ == "__main__":
    main(prog_name="p2pdeploy")
