"""Run the installed ``fieldpack`` console script (not an in-process runner), as a user's shell does.

``FIELDPACK_CLI_PYTHONPATH`` (set by scripts/cli-compat) puts another typer/click version in front, so the same
tests check the floor and the newest of the range pyproject.toml allows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def fieldpack_exe() -> str:
    """Path of the installed entry point next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "fieldpack"
    if here.exists():
        return str(here)
    found = shutil.which("fieldpack")
    if found is None:
        pytest.skip("the fieldpack console script is not installed")
    return found


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``fieldpack ARGS`` with stdout and stderr piped (so never a terminal); text mode, UTF-8."""
    e = dict(os.environ)
    e.pop("COLUMNS", None)
    extra = os.environ.get("FIELDPACK_CLI_PYTHONPATH")
    if extra:
        e["PYTHONPATH"] = extra + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([fieldpack_exe(), *args], capture_output=True, text=True, encoding="utf-8", input=stdin,
                          env=e, cwd=cwd, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The process failed with ``code`` and printed exactly one ``error: ... Fix: ...`` line on stderr, no traceback."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and " Fix: " in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
