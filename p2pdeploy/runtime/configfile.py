"""The node's config file: a TOML file whose ``[contribution]`` section is what the owner contributes.

``p2pdeploy join --config FILE`` reads it; flags given on the command line win over its keys.
This module reads the file; what the section means is
:mod:`p2pdeploy.fabric.contribution`'s business (:func:`~p2pdeploy.fabric.contribution.parse_config_section`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from p2pdeploy.fabric.contribution import ContributionError, parse_config_section


def read_config_section(path: str | os.PathLike[str], section: str = "contribution") -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file (empty when the file has none)."""
    path = Path(path)
    try:
        document = path.read_bytes()
    except OSError as exc:
        raise ContributionError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config_section(document, str(path), section)
