"""Bundles: deterministic packing, detached signatures, and the safety rules for unpacking."""

import contextlib
import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.bundle import (
    Bundle,
    BundleError,
    MemberInfo,
    check_member,
    check_members,
    pack_files,
    verify_bundle,
)
from p2pdeploy.runtime.bundlefile import bundle_from_directory, pack_directory
from p2pdeploy.runtime.exec_unpack import unpack_bundle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MANIFEST = b'name = "web"\nversion = "1"\ncommand = ["python3", "app.py"]\n'
DEPLOYER = Identity.from_seed(b"d" * 32)
STRANGER = Identity.from_seed(b"s" * 32)


def raw_tar(*members):
    """A tar.gz built by hand, for bundles ``pack_files`` would refuse to make."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, kind, content, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content else None)
    return out.getvalue()


def test_packing_the_same_files_gives_the_same_bytes():
    files = {"manifest.toml": MANIFEST, "lib/util.py": b"x = 1\n", "app.py": (b"print(1)\n", 0o755)}
    assert pack_files(files) == pack_files(dict(reversed(list(files.items()))))
    assert pack_directory(EXAMPLES / "hello") == pack_directory(EXAMPLES / "hello")


def test_a_bundle_of_the_hello_example_reads_its_manifest_and_its_members():
    bundle = bundle_from_directory(EXAMPLES / "hello")
    assert bundle.manifest.name == "hello"
    assert {m.name for m in bundle.members} == {"app.py", "manifest.toml"}


def test_a_signature_verifies_for_its_key_and_bundle_only():
    bundle = Bundle.parse(pack_files({"manifest.toml": MANIFEST}))
    signed = bundle.sign(DEPLOYER)
    assert signed.verify() and signed.public_key == DEPLOYER.public_key
    assert verify_bundle(bundle.data, signed.signature, DEPLOYER.public_key)
    assert not verify_bundle(bundle.data, signed.signature, STRANGER.public_key)
    assert not verify_bundle(bundle.data + b"\0", signed.signature, DEPLOYER.public_key)
    assert not verify_bundle(bundle.data, b"\0" * 64, DEPLOYER.public_key)


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (MemberInfo("/etc/passwd", "file"), "member '/etc/passwd' is an absolute path"),
        (MemberInfo("a/../../x", "file"), "member 'a/../../x' escapes the bundle with '..'"),
        (MemberInfo("link", "symlink", link="/etc/shadow"), "member 'link' is a link to an absolute path '/etc/shadow'"),
        (MemberInfo("a/link", "symlink", link="../../x"), "member 'a/link' is a link that leaves the bundle ('../../x')"),
        (MemberInfo("hard", "hardlink", link="app.py"), "member 'hard' is a hard link (not allowed in a bundle)"),
        (MemberInfo("dev", "other"), "member 'dev' is a device, fifo or other special file"),
        (MemberInfo("a\\b", "file"), "member 'a\\\\b' has a NUL or backslash in its name"),
    ],
)
def test_unsafe_members_are_named_with_what_is_wrong(member, problem):
    assert check_member(member) == problem


def test_safe_members_pass_including_links_that_stay_inside():
    assert check_member(MemberInfo("./app/run.py", "file", 10)) is None
    assert check_member(MemberInfo("app/current", "symlink", link="../lib/v2")) is None
    assert check_members([MemberInfo("a", "file", 10), MemberInfo("b", "file", 10)], max_unpacked_bytes=15) == (
        "unpacks to more than 15 bytes"
    )
    assert check_members([MemberInfo(f"f{i}", "file") for i in range(5)], max_members=4) == "more than 4 members"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (raw_tar(("manifest.toml", tarfile.REGTYPE, MANIFEST, ""), ("../evil", tarfile.REGTYPE, b"x", "")),
         "bundle: member '../evil' escapes the bundle with '..'"),
        (raw_tar(("manifest.toml", tarfile.REGTYPE, MANIFEST, ""), ("fifo", tarfile.FIFOTYPE, b"", "")),
         "bundle: member 'fifo' is a device, fifo or other special file"),
        (raw_tar(("app.py", tarfile.REGTYPE, b"print(1)", "")), "bundle: no manifest.toml at its root"),
        (raw_tar(("manifest.toml", tarfile.REGTYPE, b"name = 1", "")), "bundle: manifest.toml: name must be a string"),
        (b"not a tarball", "bundle: not a readable tar.gz archive"),
    ],
)  # fmt: skip
def test_a_bad_bundle_is_refused_with_the_reason(data, message):
    with pytest.raises(BundleError) as error:
        Bundle.parse(data)
    assert str(error.value).startswith(message)


def test_an_oversized_bundle_is_refused_before_it_is_read():
    with pytest.raises(BundleError, match="over the limit of 10"):
        Bundle.parse(pack_files({"manifest.toml": MANIFEST}), max_bytes=10)


def test_a_bundle_that_unpacks_to_more_than_the_disk_its_manifest_reserves_is_refused_with_both_sizes():
    manifest = MANIFEST + b'[resources]\ndisk = "1M"\n'
    data = pack_files({"manifest.toml": manifest, "zeros.bin": bytes(3 * 1024 * 1024)})
    assert len(data) < 64 * 1024  # small on the wire: only the member sizes tell
    with pytest.raises(BundleError) as error:
        Bundle.parse(data)
    unpacked = 3 * 1024 * 1024 + len(manifest)
    assert str(error.value) == (
        f"bundle: unpacks to 3.0 MiB ({unpacked} bytes), more than the 1 MiB (1048576 bytes) "
        "its manifest reserves (resources.disk)"
    )
    assert Bundle.parse(pack_files({"manifest.toml": manifest, "zeros.bin": bytes(1000)})).manifest.name == "web"


@given(st.binary(max_size=2000))
def test_random_bytes_raise_nothing_but_bundle_error(data):
    with contextlib.suppress(BundleError):
        Bundle.parse(data)


def test_unpacking_writes_the_files_and_refuses_an_escaping_member(tmp_path):
    data = pack_files({"manifest.toml": MANIFEST, "bin/run": (b"#!/bin/sh\n", 0o755), "lib/a.py": b"a = 1\n"})
    unpack_bundle(data, tmp_path / "app")
    assert (tmp_path / "app" / "lib" / "a.py").read_bytes() == b"a = 1\n"
    assert (tmp_path / "app" / "bin" / "run").stat().st_mode & 0o777 == 0o755
    evil = raw_tar(("manifest.toml", tarfile.REGTYPE, MANIFEST, ""), ("x", tarfile.SYMTYPE, b"", "/etc/passwd"))
    with pytest.raises(BundleError, match="link to an absolute path"):
        unpack_bundle(evil, tmp_path / "other")
    assert not (tmp_path / "other").exists()
