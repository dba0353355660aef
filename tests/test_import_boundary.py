"""Imports run one way, checked in every direction.

- ``fieldpack.shared`` (formats, protocol, errors as data) imports nothing else of ours.
- ``fieldpack.retrieval`` (embedder, index connection, search: code both sides run) imports only shared.
- ``fieldpack.device`` imports shared and retrieval, never builder, and never torch/transformers/onnx/gguf.
- ``fieldpack.builder`` imports shared and retrieval, never device.
- Nothing but the CLI itself (and ``python -m fieldpack``) imports ``fieldpack.cli``.

The static part walks every module's AST, imports inside functions included; the dynamic part imports every
device/retrieval/shared module and runs the device commands' ``--help`` in a fresh interpreter, then looks at
``sys.modules`` (catches transitive imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "sentence_transformers", "onnx", "gguf", "accelerate", "peft")
OURS = ("fieldpack.shared", "fieldpack.retrieval", "fieldpack.device", "fieldpack.builder", "fieldpack.cli")
#: package folder -> (its import name, which of our packages it may import, third-party names it must not import)
RULES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "shared": ("fieldpack.shared", ("fieldpack.shared",), HEAVY + ("numpy", "apsw", "llama_cpp", "onnxruntime")),
    "retrieval": ("fieldpack.retrieval", ("fieldpack.shared", "fieldpack.retrieval"), HEAVY + ("llama_cpp",)),
    "device": ("fieldpack.device", ("fieldpack.shared", "fieldpack.retrieval", "fieldpack.device"), HEAVY),
    "builder": ("fieldpack.builder", ("fieldpack.shared", "fieldpack.retrieval", "fieldpack.builder"), ()),
}
#: The old top-level names: nothing may import them any more (they are not installed).
OLD_TOP_LEVEL = ("shared", "device", "builder", "retrieval")


def _imports(py: Path, package: str) -> set[str]:
    """Absolute module names imported by ``py`` (relative imports resolved against ``package``)."""
    tree = ast.parse(py.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.add(node.module)
                if node.module == "fieldpack":
                    out.update(f"fieldpack.{a.name}" for a in node.names)
    return out


def _owner(module: str) -> str | None:
    for ours in OURS:
        if module == ours or module.startswith(ours + "."):
            return ours
    return None


@pytest.mark.parametrize("folder", sorted(RULES))
def test_package_imports_only_what_it_may(folder: str) -> None:
    name, allowed, banned = RULES[folder]
    bad = []
    for py in sorted((REPO / folder).rglob("*.py")):
        rel = py.relative_to(REPO / folder).with_suffix("")
        pkg = ".".join((name, *rel.parts[:-1]))
        for mod in sorted(_imports(py, pkg)):
            top = mod.split(".")[0]
            owner = _owner(mod)
            if owner is not None and owner not in allowed:
                bad.append(f"{py.relative_to(REPO)} imports {mod}")
            elif top in banned or top in OLD_TOP_LEVEL:
                bad.append(f"{py.relative_to(REPO)} imports {mod}")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_nothing_outside_the_cli_imports_the_cli() -> None:
    bad = []
    for folder in ("shared", "retrieval", "device", "builder", "benchmarks"):
        for py in sorted((REPO / folder).rglob("*.py")):
            hits = [m for m in _imports(py, "x") if m == "fieldpack.cli" or m.startswith("fieldpack.cli.")]
            if hits and folder != "benchmarks":
                bad.append(f"{py.relative_to(REPO)} imports {hits}")
    assert not bad, "\n".join(bad)


def test_tests_and_benchmarks_use_the_installed_names() -> None:
    """Tests and benchmarks import fieldpack.* too, so they exercise what users install."""
    bad = []
    for folder in ("tests", "benchmarks", "fieldpack"):
        for py in sorted((REPO / folder).rglob("*.py")):
            old = sorted(m for m in _imports(py, "tests") if m.split(".")[0] in OLD_TOP_LEVEL)
            if old:
                bad.append(f"{py.relative_to(REPO)}: {old}")
    assert not bad, "\n".join(bad)


def test_device_cli_runtime_imports_nothing_heavy() -> None:
    """Import every device, retrieval and shared module and the CLI, run the device commands' ``--help``
    in-process, and check sys.modules afterwards (catches transitive imports too)."""
    code = r"""
import pkgutil, importlib, sys
import fieldpack.device, fieldpack.shared, fieldpack.retrieval
for pkg in (fieldpack.device, fieldpack.shared, fieldpack.retrieval):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
import fieldpack.cli as cli
for args in (["--help"], ["ask", "--help"], ["install", "--help"], ["status", "--help"]):
    try:
        cli.main(args)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
bad = sorted(m for m in sys.modules if m.split(".")[0] in %r or m.startswith("fieldpack.builder"))
print("BAD", bad)
sys.exit(1 if bad else 0)
""" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
