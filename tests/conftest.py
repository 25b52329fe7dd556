"""Shared test configuration: the hypothesis profiles.

CI (``HYPOTHESIS_PROFILE=ci``, set by ``make test``) is derandomized and has no deadline, so
simulator-driven properties cannot fail on a slow machine or on a lucky draw.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
