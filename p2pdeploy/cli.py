"""The ``p2pdeploy`` command.

Each subcommand parses its options here and hands the work to the driver that owns it:
``join`` and ``ping`` to the trio runtime, ``simulate`` to the simulator; ``put``, ``get``,
``lookup`` and ``status`` talk to the running ``join`` node of a data directory through its
control socket.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from p2pdeploy import __version__


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


class KademliaSettingType(click.ParamType):
    """``KEY=VALUE`` naming a field of ``KademliaConfig`` (checked when the config is built)."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r} is not KEY=VALUE, e.g. replicate_interval_s=60", param, ctx)
        return key.strip(), text.strip()


def _data_dir_option(fn: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        envvar="P2PDEPLOY_DATA_DIR",
        help="The data directory of the node "
        "[default: $P2PDEPLOY_DATA_DIR, else $XDG_DATA_HOME/p2pdeploy, else ~/.local/share/p2pdeploy].",
    )(fn)


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
    from p2pdeploy.runtime.control import ControlError

    try:
        return trio.run(lambda: fn(*args, **kwargs))
    except (IdentityError, ControlError) as exc:
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
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False))
@click.option("--seed", type=int, default=None, help="Override the scenario's seed.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a scenario field, e.g. --set nodes=200 or --set network.loss=0.01 (repeatable).",
)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write results (CSV, JSON lines, resolved scenario) here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object of summary metrics as the last line.")
def simulate(scenario: str, seed: int | None, overrides: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Run a TOML churn scenario in the deterministic simulator."""
    from p2pdeploy.sim.scenario import run_cli

    run_cli(scenario, seed=seed, overrides=overrides, out=out, as_json=as_json)


@main.command()
@click.option(
    "--listen",
    type=HostPortType(allow_port_zero=True),
    default="127.0.0.1:0",
    show_default=True,
    help="Address to listen on, for UDP and TCP alike; port 0 lets the OS choose.",
)
@click.option(
    "--bootstrap",
    type=HostPortType(),
    multiple=True,
    help="Address of a node already in the community to join through (repeatable). "
    "A restarted node also rejoins through the contacts saved in its data directory.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="P2PDEPLOY_DATA_DIR",
    help="Where the node keeps its identity, routing table and control socket "
    "[default: $P2PDEPLOY_DATA_DIR, else $XDG_DATA_HOME/p2pdeploy, else ~/.local/share/p2pdeploy].",
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
@click.option(
    "--snapshot-interval",
    "snapshot_interval_s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Advanced: seconds between saves of the routing table to the data directory.",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug) to stderr.")
def join(
    listen: tuple[str, int],
    bootstrap: tuple[tuple[str, int], ...],
    data_dir: str | None,
    kademlia_settings: tuple[tuple[str, str], ...],
    snapshot_interval_s: float,
    verbose: int,
) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM.

    Creates the node's identity in the data directory on first start, prints its id and
    `listening on HOST:PORT`, joins the overlay through the --bootstrap nodes (or the contacts
    it saved last time) and reports peers as they are heard from. `p2pdeploy put/get/lookup/status
    --data-dir DIR` act on it through its control socket, DIR/control.sock.
    """
    from p2pdeploy.runtime.commands import default_data_dir, kademlia_config, make_console, run_join
    from p2pdeploy.runtime.node import RuntimeConfig

    try:
        config = RuntimeConfig(kademlia=kademlia_config(kademlia_settings), snapshot_interval_s=snapshot_interval_s)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--kademlia'") from None
    _configure_logging(verbose)
    _run_node_command(run_join, listen, list(bootstrap), data_dir or default_data_dir(), make_console(), config)


def _data_dir_or_default(data_dir: str | None) -> str:
    from p2pdeploy.runtime.commands import default_data_dir

    return data_dir or str(default_data_dir())


@main.command()
@click.argument("name")
@click.argument("value")
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the value lives unless republished [default: the overlay's, 24 h]; "
    "the node republishes what it stored while it runs.",
)
@_data_dir_option
def put(name: str, value: str, ttl_s: float | None, data_dir: str | None) -> None:
    """Store VALUE under NAME in the overlay, through the running node of the data directory.

    NAME is hashed to its key (the first 160 bits of SHA-256 of its UTF-8 bytes); VALUE is
    stored as its UTF-8 bytes, or read from standard input when it is `-`.
    """
    from p2pdeploy.runtime.commands import make_console, run_put

    data = sys.stdin.buffer.read() if value == "-" else value.encode()
    sys.exit(_run_node_command(run_put, name, data, ttl_s, _data_dir_or_default(data_dir), make_console()))


@main.command()
@click.argument("name")
@_data_dir_option
def get(name: str, data_dir: str | None) -> None:
    """Print the value stored under NAME (then a newline); exit status 1 when no node holds one."""
    from p2pdeploy.runtime.commands import make_console, run_get

    sys.exit(_run_node_command(run_get, name, _data_dir_or_default(data_dir), make_console()))


@main.command()
@click.argument("name")
@_data_dir_option
def lookup(name: str, data_dir: str | None) -> None:
    """Print the nodes closest to NAME's key, closest first: `HEX HOST:PORT` per line."""
    from p2pdeploy.runtime.commands import make_console, run_lookup

    sys.exit(_run_node_command(run_lookup, name, _data_dir_or_default(data_dir), make_console()))


@main.command()
@_data_dir_option
def status(data_dir: str | None) -> None:
    """Show the running node's id, address, routing table, stored items and counters."""
    from p2pdeploy.runtime.commands import make_console, run_status

    sys.exit(_run_node_command(run_status, _data_dir_or_default(data_dir), make_console()))


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
@click.option(
    "--listen",
    type=HostPortType(allow_port_zero=True),
    default="127.0.0.1:0",
    show_default=True,
    help="Address of the ephemeral node that sends the pings.",
)
@click.option("--interval", "interval_s", type=click.FloatRange(min=0), default=0.2, show_default=True, help="Seconds between pings.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up on a ping after this many seconds [default: when the ping protocol declares it lost].",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug) to stderr.")
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


if __name__ == "__main__":
    main(prog_name="p2pdeploy")
