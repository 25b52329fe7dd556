"""The ``p2pdeploy`` command.

Each subcommand parses its options here and hands the work to the driver that owns it:
``join`` and ``ping`` to the trio runtime, ``simulate`` to the simulator.
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

    try:
        return trio.run(lambda: fn(*args, **kwargs))
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None
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
    help="Address of a node already in the community to join through (repeatable).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="P2PDEPLOY_DATA_DIR",
    help="Where the node keeps its identity and state "
    "[default: $P2PDEPLOY_DATA_DIR, else $XDG_DATA_HOME/p2pdeploy, else ~/.local/share/p2pdeploy].",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug) to stderr.")
def join(listen: tuple[str, int], bootstrap: tuple[tuple[str, int], ...], data_dir: str | None, verbose: int) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM.

    Creates the node's identity in the data directory on first start, prints its id and
    `listening on HOST:PORT`, joins through the --bootstrap nodes and reports peers as they
    are heard from.
    """
    from p2pdeploy.runtime.commands import default_data_dir, make_console, run_join

    _configure_logging(verbose)
    _run_node_command(run_join, listen, list(bootstrap), data_dir or default_data_dir(), make_console())


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
