"""Small durable files in a node's data directory, written so a crash never leaves half a file.

The routing snapshot (``routing.cbor``, the CBOR bytes of ``Kademlia.snapshot()``) lets a
restarted node rejoin through the contacts it had, without ``--bootstrap``. A file is written
to a temporary name, flushed to disk, then renamed over the old one, and the directory is
flushed too: after a crash the file is either the old version or the new one. Contents are
produced and checked by the core (``wire.py`` is the only place that knows CBOR); this module
moves bytes only, and never unpickles anything.
"""

from __future__ import annotations

import os
from pathlib import Path

ROUTING_SNAPSHOT_FILE = "routing.cbor"
#: A routing snapshot holds at most a few thousand contacts; anything far larger is not ours.
SNAPSHOT_LIMIT_BYTES = 16 * 1024 * 1024


def write_file_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_bounded(path: Path, limit_bytes: int = SNAPSHOT_LIMIT_BYTES) -> bytes | None:
    """The file's bytes, or None when it is missing; raises ValueError when over ``limit_bytes``."""
    try:
        with open(path, "rb") as file:
            data = file.read(limit_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit_bytes:
        raise ValueError(f"{path}: over {limit_bytes} bytes, not a routing snapshot")
    return data
