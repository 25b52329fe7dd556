"""Service bundles: a tar.gz of the service directory, signed by the deployer's key.

A bundle holds ``manifest.toml`` at its root and whatever the command needs. It is built
deterministically (sorted members, mtime 0, owner 0, no gzip timestamp), so the same directory
gives the same bytes and the same SHA-256. The deployer signs that digest with Ed25519: the
signature is detached (``Bundle.sign(identity)``, ``verify_bundle(data, signature, key)``), and
what is signed is ``b"p2pdeploy bundle v1\\n" + sha256(data)``, so a bundle signature cannot
be passed off as a signature of anything else.

Unpacking is the runtime executor's job; the checks it makes are pure functions here over
member names and kinds (:func:`check_member`, :func:`check_members`): no absolute paths, no
``..``, no links that leave the bundle, no hard links or device files, and caps on the count
and the unpacked size; and a bundle never unpacks to more than the disk its manifest reserves. Reading a bundle in memory (its member list and manifest) never raises
anything but :class:`BundleError`. This module touches no file: packing a service directory
(:func:`p2pdeploy.runtime.bundlefile.pack_directory`) reads the files and hands them to :func:`pack_files`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from p2pdeploy.fabric.units import format_size
from p2pdeploy.overlay.identity import Identity, verify
from p2pdeploy.resource.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError

SIGNATURE_CONTEXT = b"p2pdeploy bundle v1\n"
#: Largest bundle a node accepts (it travels in one stream message).
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
#: Largest total of the unpacked files.
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 10_000
#: Directories and files left out when packing a service directory.
SKIPPED_NAMES = frozenset({"__pycache__", ".git", ".hg", ".svn", ".DS_Store", ".venv", ".mypy_cache", ".pytest_cache"})


class BundleError(ValueError):
    """A bundle is malformed, unsafe or too large; the message says which member and why."""


MemberKind = Literal["file", "dir", "symlink", "hardlink", "other"]


@dataclass(frozen=True, slots=True)
class MemberInfo:
    name: str
    kind: MemberKind
    size: int = 0
    link: str = ""
    mode: int = 0o644


# -- safety checks (pure) -------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """A member name without a leading ``./`` or trailing ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def check_member_name(name: str) -> str | None:
    """Why ``name`` is unsafe to unpack, or ``None``."""
    if not name or name == ".":
        return "an empty member name"
    if "\x00" in name or "\\" in name:
        return f"member {name!r} has a NUL or backslash in its name"
    if name.startswith("/"):
        return f"member {name!r} is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return f"member {name!r} escapes the bundle with '..'"
    if any(part == "" for part in parts):
        return f"member {name!r} has an empty path component"
    if len(name) > 1024 or any(len(part) > 255 for part in parts):
        return f"member {name[:64]!r}... has too long a name"
    return None


def check_member(member: MemberInfo) -> str | None:
    """Why ``member`` is unsafe to unpack, or ``None``."""
    name = normalize_name(member.name)
    problem = check_member_name(name)
    if problem is not None:
        return problem
    if member.kind == "hardlink":
        return f"member {name!r} is a hard link (not allowed in a bundle)"
    if member.kind == "other":
        return f"member {name!r} is a device, fifo or other special file"
    if member.kind == "symlink":
        link = member.link
        if not link or link.startswith("/") or "\x00" in link:
            return f"member {name!r} is a link to an absolute path {link!r}"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
        if target == ".." or target.startswith("../") or target.startswith("/"):
            return f"member {name!r} is a link that leaves the bundle ({link!r})"
    if member.size < 0:
        return f"member {name!r} has a negative size"
    return None


def check_members(
    members: Iterable[MemberInfo],
    *,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_members: int = MAX_MEMBERS,
) -> str | None:
    """Why a bundle with these members is unsafe or too large, or ``None``."""
    total = 0
    seen: set[str] = set()
    for count, member in enumerate(members, start=1):
        if count > max_members:
            return f"more than {max_members} members"
        problem = check_member(member)
        if problem is not None:
            return problem
        name = normalize_name(member.name)
        if name in seen and member.kind != "dir":
            return f"member {name!r} appears twice"
        seen.add(name)
        total += member.size
        if total > max_unpacked_bytes:
            return f"unpacks to more than {max_unpacked_bytes} bytes"
    return None


# -- reading --------------------------------------------------------------------------------


def _kind(info: tarfile.TarInfo) -> MemberKind:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "other"


def _open(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def list_members(data: bytes, *, max_members: int = MAX_MEMBERS) -> list[MemberInfo]:
    """The members of a tar.gz bundle; :class:`BundleError` when it cannot be read."""
    members: list[MemberInfo] = []
    try:
        with _open(data) as archive:
            for info in archive:
                members.append(MemberInfo(info.name, _kind(info), info.size, info.linkname, info.mode))
                if len(members) > max_members:
                    raise BundleError(f"bundle: more than {max_members} members")
    except BundleError:
        raise
    except Exception as exc:  # tarfile, gzip and zlib raise many kinds on hostile input
        raise BundleError(f"bundle: not a readable tar.gz archive ({type(exc).__name__}: {exc})") from None
    return members


def read_member(data: bytes, name: str, max_bytes: int) -> bytes:
    """The content of the regular file ``name`` in the bundle."""
    try:
        with _open(data) as archive:
            for info in archive:
                if normalize_name(info.name) == name:
                    if not info.isreg():
                        raise BundleError(f"bundle: {name} is not a regular file")
                    if info.size > max_bytes:
                        raise BundleError(f"bundle: {name} is larger than {max_bytes} bytes")
                    extracted = archive.extractfile(info)
                    assert extracted is not None
                    return extracted.read()
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"bundle: not a readable tar.gz archive ({type(exc).__name__}: {exc})") from None
    raise BundleError(f"bundle: no {name} at its root")


# -- building -------------------------------------------------------------------------------


def pack_files(files: Mapping[str, bytes | tuple[bytes, int]]) -> bytes:
    """A deterministic tar.gz of ``files`` (name -> content, or (content, mode))."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories: set[str] = set()
        for name in sorted(files):
            clean = normalize_name(name)
            problem = check_member_name(clean)
            if problem is not None:
                raise BundleError(f"bundle: {problem}")
            parent = posixpath.dirname(clean)
            missing = []
            while parent and parent not in directories:
                missing.append(parent)
                parent = posixpath.dirname(parent)
            for directory in reversed(missing):
                directories.add(directory)
                archive.addfile(_info(directory, tarfile.DIRTYPE, 0, 0o755))
            value = files[name]
            content, mode = value if isinstance(value, tuple) else (value, 0o644)
            archive.addfile(_info(clean, tarfile.REGTYPE, len(content), mode & 0o777), io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as compressed:
        compressed.write(raw.getvalue())
    return out.getvalue()


def _info(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# -- signing --------------------------------------------------------------------------------


def bundle_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def signing_payload(data: bytes) -> bytes:
    return SIGNATURE_CONTEXT + bundle_digest(data)


def sign_bundle(data: bytes, identity: Identity) -> bytes:
    return identity.sign(signing_payload(data))


def verify_bundle(data: bytes, signature: bytes, public_key: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of this bundle."""
    return verify(public_key, signature, signing_payload(data))


@dataclass(frozen=True, slots=True)
class SignedBundle:
    data: bytes = field(repr=False)
    public_key: bytes
    signature: bytes

    @property
    def digest(self) -> bytes:
        return bundle_digest(self.data)

    def verify(self) -> bool:
        return verify_bundle(self.data, self.signature, self.public_key)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle whose members passed the safety checks and whose manifest is valid."""

    data: bytes = field(repr=False)
    manifest: Manifest
    members: tuple[MemberInfo, ...] = field(repr=False, default=())

    @property
    def digest(self) -> bytes:
        return bundle_digest(self.data)

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        max_bytes: int = MAX_BUNDLE_BYTES,
        max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    ) -> Bundle:
        """Check a bundle's size, members and manifest; :class:`BundleError` names what is wrong."""
        if len(data) > max_bytes:
            raise BundleError(f"bundle: {len(data)} bytes, over the limit of {max_bytes}")
        members = list_members(data)
        problem = check_members(members, max_unpacked_bytes=max_unpacked_bytes)
        if problem is not None:
            raise BundleError(f"bundle: {problem}")
        manifest_bytes = read_member(data, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        try:
            manifest = Manifest.parse(manifest_bytes, MANIFEST_NAME)
        except ManifestError as exc:
            raise BundleError(f"bundle: {exc}") from None
        unpacked = sum(member.size for member in members)
        reserved = manifest.resources.disk_bytes
        if unpacked > reserved:
            raise BundleError(
                f"bundle: unpacks to {format_size(unpacked)} ({unpacked} bytes), more than the {format_size(reserved)} "
                f"({reserved} bytes) its manifest reserves (resources.disk)"
            )
        return cls(data, manifest, tuple(members))

    def sign(self, identity: Identity) -> SignedBundle:
        return SignedBundle(self.data, identity.public_key, sign_bundle(self.data, identity))
