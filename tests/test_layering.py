"""The layering rules: the core touches no I/O, clock or global randomness, and imports point down.

The core (``core.py``, ``wire.py`` and the fabric, overlay, resource and collective layers) is
sans-I/O: it imports no sockets, processes, clocks or global randomness, and reads or writes no
file (no ``os``, ``pathlib``, ``shutil``, ``sqlite3``, ``tempfile``, no ``open``). Files are the
business of the drivers and of the I/O module beside the CLI (:mod:`p2pdeploy.files`).

Every module has a place in :data:`LAYERS`, and a ``p2pdeploy`` import (absolute or relative,
at the top, inside a function or under ``TYPE_CHECKING``) names a module of its own layer or of
one below. Within a layer, the pairs in :data:`UNRELATED` never import each other: core and wire
are independent, and neither driver depends on the other.
"""

import ast
from pathlib import Path

import p2pdeploy

ROOT = Path(p2pdeploy.__file__).parent

CORE_LAYERS = ("fabric", "overlay", "resource", "collective")
CORE_MODULES = ("core.py", "wire.py", "node.py")
FORBIDDEN = {
    "trio", "socket", "subprocess", "time", "random", "asyncio", "secrets", "selectors", "threading",
    "os", "pathlib", "shutil", "sqlite3", "tempfile",
}  # fmt: skip
#: ``io`` is allowed for in-memory buffers (``BytesIO``, ``StringIO``); these names reach files.
FORBIDDEN_IO_NAMES = {"open", "open_code", "FileIO", "BufferedReader", "BufferedWriter", "BufferedRandom"}
#: Methods that read or write a file whatever object they are called on (a ``Path`` usually).
FILE_METHODS = {"open", "read_text", "write_text", "read_bytes", "write_bytes"}

#: Lowest first. A module may import from its own layer or any layer below.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__init__", "core", "wire"}),
    frozenset({"fabric"}),
    frozenset({"overlay"}),
    frozenset({"resource"}),
    frozenset({"collective"}),
    frozenset({"node"}),  # p2pdeploy/node.py: the one function that builds a node's whole stack
    frozenset({"runtime", "sim"}),  # the drivers
    frozenset({"cli", "api", "demo", "__main__", "files"}),  # the interface
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
UNRELATED = {("core", "wire"), ("wire", "core"), ("runtime", "sim"), ("sim", "runtime")}


def _core_files() -> list[Path]:
    return [p for layer in CORE_LAYERS for p in (ROOT / layer).rglob("*.py")] + [ROOT / m for m in CORE_MODULES]


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


def _file_access(path: Path) -> list[str]:
    """Where the module opens, reads or writes a file: ``open(...)``, ``x.read_text()``, ``io.FileIO``...

    A call handed an in-memory ``fileobj=`` (``tarfile.open(fileobj=io.BytesIO(data))``) opens no file.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not any(k.arg == "fileobj" for k in node.keywords):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                found.append((node.lineno, "open()"))
            elif isinstance(func, ast.Attribute) and func.attr in FILE_METHODS:
                found.append((node.lineno, f".{func.attr}()"))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "io":
            if node.attr in FORBIDDEN_IO_NAMES:
                found.append((node.lineno, f"io.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "io" and node.level == 0:
            found.extend((node.lineno, f"io.{a.name}") for a in node.names if a.name in FORBIDDEN_IO_NAMES)
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_core_layers_import_no_io_time_or_randomness():
    offenders = {}
    files = _core_files()
    assert all(path.exists() for path in files)
    assert len(files) > len(CORE_MODULES), "the core layers have no modules to check"
    for path in files:
        bad = _imported_modules(path) & FORBIDDEN
        if bad or _uses_os_randomness(path):
            offenders[str(path.relative_to(ROOT))] = sorted(bad) or ["os.urandom/datetime.now"]
    assert offenders == {}


def test_core_layers_read_and_write_no_files():
    offenders = {str(path.relative_to(ROOT)): found for path in _core_files() if (found := _file_access(path))}
    assert offenders == {}


def test_the_scan_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom time import monotonic\nimport trio.lowlevel\nimport io\nfrom pathlib import Path\n"
        "def later():\n    import shutil, sqlite3\n    from tempfile import mkdtemp\n"
    )
    assert _imported_modules(sample) & FORBIDDEN == {"os", "time", "trio", "pathlib", "shutil", "sqlite3", "tempfile"}


def test_the_scan_catches_file_access(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import io, tarfile\nfrom io import FileIO\n"
        "with open('x') as f:\n    pass\n"
        "def load(path):\n    return path.read_bytes() + path.read_text().encode()\n"
        "def save(path, data):\n    path.write_bytes(data)\n    path.write_text('')\n    path.open('w')\n"
        "raw = io.open('x')\n"
        # In memory: no file.
        "buffer = io.BytesIO(b'')\narchive = tarfile.open(fileobj=buffer, mode='r:gz')\ntext = io.StringIO()\n"
    )
    assert _file_access(sample) == [
        "line 2: io.FileIO",
        "line 3: open()",
        "line 6: .read_bytes()",
        "line 6: .read_text()",
        "line 8: .write_bytes()",
        "line 9: .write_text()",
        "line 10: .open()",
        "line 11: .open()",
        "line 11: io.open",
    ]


# -- the layer table ------------------------------------------------------------------------


def _layer_of(path: Path, root: Path) -> str:
    """The layer name of a module: its top-level package, or its file's stem at the top."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def _module_parts(path: Path, root: Path) -> list[str]:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _package_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, top-level module of the package) for every import of the package ``root`` in ``path``."""
    package = root.name
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_parts(path, root)
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".") if node.module else []
            if not parts or parts[0] != package:
                continue
            if len(parts) > 1:
                found.append((node.lineno, parts[1]))
            else:  # from p2pdeploy import wire, __version__
                for alias in node.names:
                    is_module = (root / f"{alias.name}.py").exists() or (root / alias.name).is_dir()
                    found.append((node.lineno, alias.name if is_module or alias.name in RANK else "__init__"))
    return sorted(found)


def _layer_violations(root: Path) -> list[str]:
    violations = []
    for path in sorted(root.rglob("*.py")):
        source = _layer_of(path, root)
        where = path.relative_to(root)
        if source not in RANK:
            violations.append(f"{where}: {source} has no place in the layer table")
            continue
        for line, target in _package_imports(path, root):
            if target == source:
                continue
            if target not in RANK:
                violations.append(f"{where}:{line} imports {target}, which has no place in the layer table")
            elif RANK[target] > RANK[source]:
                violations.append(f"{where}:{line} imports {target}, a layer above {source}")
            elif (source, target) in UNRELATED:
                violations.append(f"{where}:{line} imports {target}, which {source} must not depend on")
    return violations


def test_every_import_points_down_the_layer_table():
    assert _layer_violations(ROOT) == []


def test_the_layer_table_covers_the_package():
    layers = {_layer_of(path, ROOT) for path in ROOT.rglob("*.py")}
    assert layers >= {"core", "wire", *CORE_LAYERS, "runtime", "sim", "cli", "api"}
    assert layers <= set(RANK)


def test_the_layer_scan_catches_upward_sideways_and_unknown_imports(tmp_path):
    root = tmp_path / "p2pdeploy"
    for package in ("overlay", "fabric", "sim", "runtime"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "wire.py").write_text("from p2pdeploy import __version__\n")
    (root / "core.py").write_text("from . import wire\n")
    (root / "overlay" / "routing.py").write_text(
        "from p2pdeploy.core import Stack\nfrom ..fabric import units\nfrom .kademlia import Kademlia\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p2pdeploy.runtime.node import RuntimeNode\n"
    )
    (root / "fabric" / "machine.py").write_text("def probe():\n    import p2pdeploy.overlay.identity\n")
    (root / "sim" / "engine.py").write_text("from ..runtime import transport\nfrom p2pdeploy import node\n")
    (root / "runtime" / "node.py").write_text("from p2pdeploy.plugins import extra\n")
    (root / "tools.py").write_text("")
    assert _layer_violations(root) == [
        "core.py:1 imports wire, which core must not depend on",
        "fabric/machine.py:2 imports overlay, a layer above fabric",
        "overlay/routing.py:6 imports runtime, a layer above overlay",
        "runtime/node.py:1 imports plugins, which has no place in the layer table",
        "sim/engine.py:1 imports runtime, which sim must not depend on",
        "tools.py: tools has no place in the layer table",
    ]
