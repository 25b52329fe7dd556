"""The files p2pdeploy reads and writes: key files stay private, config and manifest files name themselves."""

import os
import stat
from pathlib import Path

import pytest

from p2pdeploy.fabric.contribution import ANY, ContributionError
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.units import GIB
from p2pdeploy.files import (
    KEY_FILE,
    bundle_from_directory,
    load_contribution,
    load_identity,
    load_manifest,
    load_or_create_identity,
    pack_directory,
    read_config_section,
    save_identity,
)
from p2pdeploy.overlay.identity import Identity, IdentityError
from p2pdeploy.resource.bundle import BundleError
from p2pdeploy.resource.manifest import ManifestError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MACHINE = Machine(
    cores=4, memory_total_bytes=8 * GIB, memory_free_bytes=6 * GIB, disk_total_bytes=100 * GIB, disk_free_bytes=40 * GIB
)
KEY = bytes(range(32))


# -- key files ------------------------------------------------------------------------------


def test_key_file_is_created_private_and_reloaded(tmp_path):
    first, created = load_or_create_identity(tmp_path / "node")
    assert created
    path = tmp_path / "node" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_identity(tmp_path / "node")
    assert not created_again
    assert again.node_id == first.node_id
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == [KEY_FILE]  # no temporary file left


def test_a_readable_key_file_is_refused_with_the_fix(tmp_path):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_a_truncated_key_file_is_refused(tmp_path):
    load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(b"short")
    os.chmod(tmp_path / KEY_FILE, 0o600)
    with pytest.raises(IdentityError, match="32-byte"):
        load_or_create_identity(tmp_path)


def test_a_saved_identity_loads_back_from_any_path(tmp_path):
    identity = Identity.from_seed(b"k" * 32)
    path = tmp_path / "keys" / "deployer.key"
    save_identity(identity, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).node_id == identity.node_id
    replacement = Identity.from_seed(b"r" * 32)
    save_identity(replacement, path)  # replaces the file whole
    assert load_identity(path).node_id == replacement.node_id
    assert sorted(p.name for p in path.parent.iterdir()) == ["deployer.key"]


# -- config files ---------------------------------------------------------------------------


def test_the_config_file_section_is_read_and_defaults_trust_nobody(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[contribution]\ncpu = 2\nmemory = "1G"\ntrusted_keys = "any"\n')
    c = load_contribution(path, MACHINE)
    assert (c.cpu_cores, c.memory_bytes, c.trusted_keys) == (2, GIB, ANY)
    (tmp_path / "empty.toml").write_text("")
    assert not load_contribution(tmp_path / "empty.toml").trusts(KEY)
    (tmp_path / "bad.toml").write_text("[contribution\n")
    with pytest.raises(ContributionError, match="bad.toml: not valid TOML"):
        load_contribution(tmp_path / "bad.toml")


def test_config_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[contribution]\nmemory = "lots"\n')
    with pytest.raises(ContributionError, match=r"^node.toml: contribution.memory: "):
        load_contribution(path)
    with pytest.raises(ContributionError, match=rf"^{tmp_path / 'missing.toml'}: cannot read: No such file"):
        read_config_section(tmp_path / "missing.toml")
    path.write_text("[other]\nx = 1\n")
    assert read_config_section(path, "other") == {"x": 1}
    assert read_config_section(path) == {}


# -- manifests and service directories ------------------------------------------------------


def test_a_manifest_file_reads_and_names_itself(tmp_path):
    assert load_manifest(EXAMPLES / "hello" / "manifest.toml").name == "hello"
    with pytest.raises(ManifestError, match=rf"^{tmp_path / 'manifest.toml'}: cannot read: No such file"):
        load_manifest(tmp_path / "manifest.toml")
    (tmp_path / "manifest.toml").write_text('name = "web"\nversion = "1"\n')
    with pytest.raises(ManifestError, match=r"^manifest.toml: "):
        load_manifest(tmp_path / "manifest.toml")


def test_a_service_directory_packs_its_files_but_not_caches_or_links(tmp_path):
    (tmp_path / "manifest.toml").write_text('name = "web"\nversion = "1"\ncommand = ["./run"]\n')
    (tmp_path / "run").write_text("#!/bin/sh\n")
    (tmp_path / "run").chmod(0o755)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"\0")
    bundle = bundle_from_directory(tmp_path)
    assert bundle.data == pack_directory(tmp_path)
    assert {(m.name, m.mode) for m in bundle.members} == {("manifest.toml", 0o644), ("run", 0o755)}
    (tmp_path / "link").symlink_to("run")
    with pytest.raises(BundleError, match="links are not packed into bundles"):
        pack_directory(tmp_path)
    with pytest.raises(BundleError, match="no manifest.toml in the service directory"):
        pack_directory(tmp_path / "__pycache__")
