"""Fixtures shared by the fabric tests: example bundles, and a replica directory any uid can enter."""

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
