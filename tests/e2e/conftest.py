"""End-to-end fixtures: a real tiny model trained on the demo documents, a real signed bundle built from it, a
device data dir with it installed. Built once per session and cached on disk (keyed by the inputs)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_DOCS = REPO / "demo" / "docs"
#: Bump when the build pipeline changes in a way the cached bundle must reflect.
E2E_CACHE_VERSION = "e2e-1"


def _tree_hash(*paths: Path) -> str:
    h = hashlib.sha256(E2E_CACHE_VERSION.encode())
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fieldpack ARGS`` as a user would; returns the completed process (never raises)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fieldpack", *args], cwd=REPO, capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)


@pytest.fixture(scope="session")
def e2e_dir() -> Path:
    root = Path(os.environ.get("FIELDPACK_TEST_CACHE", REPO / ".fieldpack-cache" / "tests"))
    d = root / f"e2e-{_tree_hash(DEMO_DOCS, REPO / 'builder', REPO / 'shared')}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def keys(e2e_dir: Path) -> Path:
    k = e2e_dir / "keys"
    if not (k / "builder.key").exists():
        shutil.rmtree(k, ignore_errors=True)
        from shared.signing import generate_keypair

        generate_keypair(k)
    return k


@pytest.fixture(scope="session")
def tiny_llama(e2e_dir: Path) -> Path:
    d = e2e_dir / "tiny-llama"
    if not (d / "config.json").exists():
        from builder.tinymodel import load_corpus, make_tiny_model

        tmp = e2e_dir / "tiny-llama.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, arch="llama", corpus=load_corpus(DEMO_DOCS))
        tmp.rename(d)
    return d


def _build(e2e_dir: Path, keys: Path, model: Path, version: str, quant: str) -> Path:
    out = e2e_dir / f"riverside-{version}-{quant}.fpk"
    if not out.exists():
        r = run_cli("build", "--model", str(model), "--docs", str(DEMO_DOCS), "--quant", quant,
                    "--name", "riverside", "--version", version, "--sign", str(keys / "builder.key"),
                    "-o", str(out), "--n-ctx", "1024")
        assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def bundle_v1(e2e_dir: Path, keys: Path, tiny_llama: Path) -> Path:
    """Signed Q4_K_M bundle of the tiny llama model over demo/docs, version 1.0.0."""
    return _build(e2e_dir, keys, tiny_llama, "1.0.0", "Q4_K_M")


@pytest.fixture(scope="session")
def bundle_v2(e2e_dir: Path, keys: Path, tiny_llama: Path) -> Path:
    """Same inputs, Q8_0, version 1.1.0: a second real bundle for upgrade/rollback."""
    return _build(e2e_dir, keys, tiny_llama, "1.1.0", "Q8_0")


@pytest.fixture()
def device_dir(tmp_path: Path, keys: Path, bundle_v1: Path) -> Path:
    """A fresh data dir with bundle_v1 installed."""
    d = tmp_path / "device"
    r = run_cli("device", "init", "--data-dir", str(d), "--trust", str(keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    r = run_cli("install", str(bundle_v1), "--data-dir", str(d))
    assert r.returncode == 0, r.stderr
    return d
