"""Bundles on disk: service directories packed into bundles, and signed bundle files.

:func:`pack_directory` packs a service directory (``manifest.toml`` at its root) into the
deterministic archive of :mod:`p2pdeploy.resource.bundle`; :func:`bundle_from_directory` also checks
its members and manifest. A signed bundle is stored as the bundle (a plain ``.tar.gz``) and a
detached signature file beside it.

``p2pdeploy bundle DIR --out hello.tar.gz`` writes ``hello.tar.gz`` (the deterministic archive of
:mod:`p2pdeploy.resource.bundle`, so ``tar tzf`` lists it) and ``hello.tar.gz.sig``, a short text
file in the manner of minisign and ``gpg --detach-sign``::

    p2pdeploy bundle signature v1
    sha256 <64 hex digits of the bundle's SHA-256>
    key <64 hex digits of the signer's Ed25519 public key>
    signature <128 hex digits>

``p2pdeploy replica start hello.tar.gz`` reads both. The node checks the signature itself
(and whether it trusts the key); reading checks it too, so a bundle that does not match its
signature file is caught before anything is sent.
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pdeploy.resource.bundle import (
    MAX_BUNDLE_BYTES,
    SKIPPED_NAMES,
    Bundle,
    BundleError,
    SignedBundle,
    bundle_digest,
    pack_files,
    verify_bundle,
)
from p2pdeploy.resource.manifest import MANIFEST_NAME
from p2pdeploy.runtime.snapshot import write_file_atomically

SIGNATURE_HEADER = "p2pdeploy bundle signature v1"
SIGNATURE_SUFFIX = ".sig"


class BundleFileError(ValueError):
    """A bundle file or its signature file cannot be used; the message names the file."""


def pack_directory(directory: str | os.PathLike[str]) -> bytes:
    """A deterministic tar.gz of a service directory (regular files; caches and VCS dirs skipped)."""
    root = Path(directory)
    if not (root / MANIFEST_NAME).is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME} in the service directory")
    files: dict[str, tuple[bytes, int]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part in SKIPPED_NAMES or part.endswith(".pyc") for part in relative.parts):
            continue
        if path.is_symlink():
            raise BundleError(f"{path}: links are not packed into bundles; copy the file instead")
        if path.is_file():
            files[relative.as_posix()] = (path.read_bytes(), 0o755 if path.stat().st_mode & 0o111 else 0o644)
    return pack_files(files)


def bundle_from_directory(directory: str | os.PathLike[str]) -> Bundle:
    """A service directory packed, with its members and manifest checked (:meth:`Bundle.parse`)."""
    return Bundle.parse(pack_directory(directory))


def signature_path(bundle_path: str | os.PathLike[str]) -> Path:
    path = Path(bundle_path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def format_signature(signed: SignedBundle) -> str:
    return (
        f"{SIGNATURE_HEADER}\n"
        f"sha256 {signed.digest.hex()}\n"
        f"key {signed.public_key.hex()}\n"
        f"signature {signed.signature.hex()}\n"
    )


def write_signed_bundle(path: str | os.PathLike[str], signed: SignedBundle) -> Path:
    """Write the bundle to ``path`` and its signature to ``path.sig``; the signature's path."""
    path = Path(path)
    sig_path = signature_path(path)
    write_file_atomically(path, signed.data, mode=0o644)
    write_file_atomically(sig_path, format_signature(signed).encode(), mode=0o644)
    return sig_path


def read_signed_bundle(path: str | os.PathLike[str], max_bytes: int = MAX_BUNDLE_BYTES) -> SignedBundle:
    """The bundle at ``path`` with the signature from ``path.sig``; :class:`BundleFileError` says what is wrong."""
    path = Path(path)
    sig_path = signature_path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BundleFileError(f"{path}: {size} bytes, over the bundle limit of {max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise BundleFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = sig_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise BundleFileError(
            f"{sig_path} not found: a bundle travels with its signature; make both with `p2pdeploy bundle DIR --out {path}`"
        ) from None
    except OSError as exc:
        raise BundleFileError(f"{sig_path}: cannot read: {exc.strerror or exc}") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != SIGNATURE_HEADER:
        raise BundleFileError(f"{sig_path}: not a p2pdeploy bundle signature (its first line is not {SIGNATURE_HEADER!r})")
    fields: dict[str, bytes] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, _, value = line.strip().partition(" ")
        try:
            fields[name] = bytes.fromhex(value.strip())
        except ValueError:
            raise BundleFileError(f"{sig_path}:{number}: {name} is not hex digits") from None
    expected = {"sha256": 32, "key": 32, "signature": 64}
    for name, length in expected.items():
        if len(fields.get(name, b"")) != length:
            raise BundleFileError(f"{sig_path}: needs a line `{name} <{2 * length} hex digits>`")
    if fields["sha256"] != bundle_digest(data):
        raise BundleFileError(f"{path} does not match {sig_path} (its SHA-256 differs): the bundle changed after signing")
    signed = SignedBundle(data, fields["key"], fields["signature"])
    if not verify_bundle(data, signed.signature, signed.public_key):
        raise BundleFileError(f"{sig_path}: the signature is not the key's signature of {path}")
    return signed
