"""``python -m p2pdeploy``: the ``p2pdeploy`` command."""

from p2pdeploy.cli import main

main(prog_name="p2pdeploy")
