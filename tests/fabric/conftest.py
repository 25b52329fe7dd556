"""Fixtures shared by the fabric tests: example bundles, and a replica directory any uid can enter."""

import shutil
import tempfile
from pathlib import Path

import pytest

from p2pdeploy.runtime.bundlefile import pack_directory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def behave_bundle() -> bytes:
    return pack_directory(EXAMPLES / "behave")


@pytest.fixture(scope="session")
def hello_bundle() -> bytes:
    return pack_directory(EXAMPLES / "hello")


@pytest.fixture
def service_root():
    """A data directory under /tmp that an unprivileged service user can traverse.

    pytest's tmp_path lives under a mode-700 directory of root's, which a service running as
    ``nobody`` could not enter; the executor refuses such a directory (see its own test).
    """
    root = Path(tempfile.mkdtemp(prefix="p2pdeploy-test-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
