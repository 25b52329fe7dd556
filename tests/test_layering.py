"""The sans-I/O rule: the core layers never import I/O, clocks or global randomness."""

import ast
from pathlib import Path

import p2pdeploy

CORE_LAYERS = ("fabric", "overlay", "resource", "collective")
FORBIDDEN = {"trio", "socket", "subprocess", "time", "random", "asyncio", "secrets", "selectors", "threading"}
ROOT = Path(p2pdeploy.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _uses_os_randomness(path: Path) -> bool:
    source = path.read_text()
    return "os.urandom" in source or "datetime.now" in source


def test_core_layers_import_no_io_time_or_randomness():
    offenders = {}
    files = [p for layer in CORE_LAYERS for p in (ROOT / layer).rglob("*.py")]
    assert files, "the core layers have no modules to check"
    for path in files:
        bad = _imported_modules(path) & FORBIDDEN
        if bad or _uses_os_randomness(path):
            offenders[str(path.relative_to(ROOT))] = sorted(bad) or ["os.urandom/datetime.now"]
    assert offenders == {}


def test_the_scan_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\nimport trio.lowlevel\n")
    assert _imported_modules(sample) & FORBIDDEN == {"time", "trio"}
