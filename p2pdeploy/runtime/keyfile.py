"""The node's key file: ``DATA_DIR/identity.key``, the 32-byte Ed25519 seed, mode 0600.

A node creates its key on first start and loads it on every start after, so its id survives
restarts. The file is written through a temporary file and renamed, so a crash never leaves half
a key; a key file others can read is refused with the fix (``chmod 600``). What the bytes mean is
:class:`~p2pdeploy.overlay.identity.Identity`'s business; this module only reads and writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pdeploy.overlay.identity import Identity, IdentityError
from p2pdeploy.runtime.snapshot import write_file_atomically

KEY_FILE = "identity.key"


def key_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the key of the node with data directory ``data_dir`` lives."""
    return Path(data_dir) / KEY_FILE


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """The identity in the key file ``path``; :class:`IdentityError` when others can read it or it is not a key."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(f"{path}: key file is readable by others (mode {mode:o}); run chmod 600 on it")
    return Identity.from_key_file(path.read_bytes(), str(path))


def save_identity(identity: Identity, path: str | os.PathLike[str]) -> None:
    """Write ``identity``'s key to ``path`` (mode 0600, atomically), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, identity.private_bytes(), mode=0o600)


def load_or_create_identity(data_dir: str | os.PathLike[str]) -> tuple[Identity, bool]:
    """Load the node's key from ``data_dir``, creating it (mode 0600) on first start.

    Returns the identity and whether it was created now.
    """
    path = key_path(data_dir)
    if path.exists():
        return load_identity(path), False
    identity = Identity.generate()
    save_identity(identity, path)
    return identity, True
