"""The files p2pdeploy reads and writes outside a node's store, in one place.

The core layers parse bytes and text into objects and serialise objects to bytes; they open no
file. Reading and writing the files is here:

- a node's key: :func:`load_or_create_identity` (``DATA_DIR/identity.key``, mode 0600, written
  atomically), :func:`load_identity` and :func:`save_identity` for a key file anywhere;
- the owner's contribution: :func:`load_contribution` (the ``[contribution]`` section of a TOML
  config file) and :func:`read_config_section` (any section, as a table);
- services: :func:`load_manifest` (a ``manifest.toml``), :func:`pack_directory` and
  :func:`bundle_from_directory` (a service directory packed into a bundle), and
  :func:`write_signed_bundle` / :func:`read_signed_bundle` (a bundle file and its ``.sig``).

The node itself needs its key, its config file and bundles, and the trio driver sits below this
module in the layers, so those helpers live in :mod:`p2pdeploy.runtime` and are named here again.
Errors name the file: ``manifest.toml``'s own problems as :class:`ManifestError`, a config file's
as :class:`ContributionError`, a key file's as :class:`IdentityError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.resource.manifest import Manifest, ManifestError
from p2pdeploy.runtime.bundlefile import (
    bundle_from_directory,
    pack_directory,
    read_signed_bundle,
    write_signed_bundle,
)
from p2pdeploy.runtime.configfile import read_config_section
from p2pdeploy.runtime.keyfile import (
    KEY_FILE,
    key_path,
    load_identity,
    load_or_create_identity,
    save_identity,
)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest in the file ``path``; :class:`ManifestError` names the file and the field."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return Manifest.parse(data, path.name)


def load_contribution(
    path: str | os.PathLike[str], machine: Machine | None = None, *, section: str = "contribution"
) -> Contribution:
    """Read the ``[section]`` of a TOML config file (the defaults when the section is absent)."""
    path = Path(path)
    table = read_config_section(path, section)
    return Contribution.from_table(table, machine, source=path.name, section=section)


__all__ = [
    "KEY_FILE",
    "bundle_from_directory",
    "key_path",
    "load_contribution",
    "load_identity",
    "load_manifest",
    "load_or_create_identity",
    "pack_directory",
    "read_config_section",
    "read_signed_bundle",
    "save_identity",
    "write_signed_bundle",
]
