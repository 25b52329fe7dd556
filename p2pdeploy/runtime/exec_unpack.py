"""Unpacking a bundle into a replica's directory, safely.

The members are checked first with the pure rules of :mod:`p2pdeploy.resource.bundle` (no
absolute paths, no ``..``, no links leaving the bundle, no hard links or devices, a size cap),
then extracted with tarfile's ``data`` filter as a second line of defence (it also drops
setuid bits and refuses anything outside the destination). Files end up owned by the node,
readable by the service; the service writes only to its data directory.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from p2pdeploy.resource.bundle import (
    MAX_UNPACKED_BYTES,
    BundleError,
    check_members,
    list_members,
)


def unpack_bundle(data: bytes, destination: Path, *, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Replace ``destination`` with the bundle's files; :class:`BundleError` says what was refused."""
    members = list_members(data)
    problem = check_members(members, max_unpacked_bytes=max_unpacked_bytes)
    if problem is not None:
        raise BundleError(f"bundle: {problem}")
    staging = destination.with_name(destination.name + ".unpacking")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, mode=0o755)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            archive.extractall(staging, filter="data")
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
            elif path.is_file() and not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"bundle: cannot unpack: {exc}") from None
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
