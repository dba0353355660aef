"""The device side never imports torch, transformers or builder; shared imports neither builder nor device."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_ON_DEVICE = ("torch", "transformers", "builder", "sentence_transformers", "onnx", "gguf")


def _imports(py: Path) -> set[str]:
    tree = ast.parse(py.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("device", FORBIDDEN_ON_DEVICE),
    ("shared", ("builder", "device", "torch", "transformers")),
])
def test_no_forbidden_import_statements(package: str, forbidden: tuple[str, ...]) -> None:
    """Static check over every module, including imports inside functions."""
    bad = []
    for py in sorted((REPO / package).rglob("*.py")):
        hit = _imports(py) & set(forbidden)
        if hit:
            bad.append(f"{py.relative_to(REPO)}: {sorted(hit)}")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_device_cli_runtime_imports_nothing_heavy() -> None:
    """Import every device module and the CLI, run `fieldpack --help` and `ask --help` in-process, and check
    sys.modules afterwards (catches transitive imports too)."""
    code = r"""
import pkgutil, importlib, sys
import device, shared
for pkg in (device, shared):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
import fieldpack.cli as cli
for args in (["--help"], ["ask", "--help"], ["install", "--help"], ["status", "--help"]):
    try:
        cli.main(args)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
bad = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print("BAD", bad)
sys.exit(1 if bad else 0)
""" % (FORBIDDEN_ON_DEVICE,)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
