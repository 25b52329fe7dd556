"""The ``p2pdeploy`` command.

Each subcommand parses its options here and hands the work to the driver that owns it:
``join`` and ``ping`` to the trio runtime, ``simulate`` to the simulator.
"""

from __future__ import annotations

import click

from p2pdeploy import __version__


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
