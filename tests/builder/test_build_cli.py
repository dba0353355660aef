"""`fieldpack build` refuses bad input in one line, with a non-zero exit, before heavy work, leaving nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEMO_DOCS, run_cli


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    from fieldpack.shared.signing import generate_keypair

    generate_keypair(d)
    return d


def _build(model: Path | str, docs: Path, key: Path, out: Path, *extra: str):
    return run_cli("build", "--model", str(model), "--docs", str(docs), "--name", "t", "--sign", str(key),
                   "-o", str(out), *extra, timeout=300)


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Fix:" in lines[-1], r.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], lines[-1]


def _refused(r, out: Path, code: int, *needles: str) -> None:
    """One-line error with ``code`` and nothing left behind: the output folder (empty before the build) holds
    nothing after it: no bundle, no hidden temp file, no build work folder (the build works beside its output)."""
    _one_line_error(r, code, *needles)
    assert not out.exists()
    if out.parent.is_dir():
        assert sorted(p.name for p in out.parent.iterdir()) == [], sorted(out.parent.iterdir())


def _out(tmp_path: Path) -> Path:
    """``tmp_path/out/b.fpk`` in an empty folder of its own, so leftovers are visible."""
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d / "b.fpk"


def test_missing_model_folder(tmp_path: Path, keypair: Path) -> None:
    out = _out(tmp_path)
    r = _build(tmp_path / "no-such-model", DEMO_DOCS, keypair / "builder.key", out)
    _refused(r, out, 2, "no-such-model")


def test_unsupported_architecture(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    model = tmp_path / "gpt-neox"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    out = _out(tmp_path)
    r = _build(model, DEMO_DOCS, keypair / "builder.key", out)
    _refused(r, out, 5, "GPTNeoXForCausalLM")


def test_unknown_tokenizer(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    model = tmp_path / "odd-tok"
    shutil.copytree(tiny_llama_dir, model)
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    out = _out(tmp_path)
    r = _build(model, DEMO_DOCS, keypair / "builder.key", out)
    _refused(r, out, 5, "tokenizer")


@pytest.mark.parametrize("flags,needles", [
    (("--quant", "Q4_X"), ("Q4_X", "Q4_K_M")),
    (("--embd-type", "Q9"), ("--embd-type", "Q8_0")),
    (("--prune", "wanda", "--sparsity", "2"), ("--sparsity 2.0 is outside (0, 1)",)),
    (("--sparsity", "0.5"), ("--sparsity applies to --prune",)),
    (("--prune", "depth", "--drop-layers", "9"), ("--drop-layers 9 would drop every decoder block",)),
    (("--exclude", "*.csv", "--exclude", "/srv/docs/old"), ("--exclude '/srv/docs/old' is not a path under --docs",
                                                           "relative to the docs folder")),
])
def test_a_wrong_build_option_is_a_usage_error(tmp_path: Path, keypair: Path, tiny_llama_dir: Path,
                                              flags: tuple[str, ...], needles: tuple[str, ...]) -> None:
    """Exit 2 like every usage mistake (README), whether typer or our own validation catches it."""
    out = _out(tmp_path)
    r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.key", out, *flags)
    _refused(r, out, 2, *needles)


def test_docs_with_nothing_indexable(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.md").write_text("")
    (docs / "blob.bin").write_bytes(os.urandom(64))
    out = _out(tmp_path)
    r = _build(tiny_llama_dir, docs, keypair / "builder.key", out)
    _refused(r, out, 5, str(docs))


def test_docs_all_excluded(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    out = _out(tmp_path)
    r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.key", out, "--exclude", "*.*")
    _refused(r, out, 5, str(DEMO_DOCS), "--exclude leaves nothing to index", "narrow the --exclude patterns")
    assert "embedder" not in r.stderr  # refused while checking the inputs, before any stage (a trial)


def test_signing_key_missing_or_wrong_type(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    out = _out(tmp_path)
    r = _build(tiny_llama_dir, DEMO_DOCS, tmp_path / "nokey.key", out)
    _refused(r, out, 3, "nokey.key", "keygen")
    out = _out(tmp_path)
    r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.pub", out)
    _refused(r, out, 3, "builder.pub")


def test_output_not_writable(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.key", tmp_path / "missing-dir" / "b.fpk")
    _refused(r, tmp_path / "missing-dir" / "b.fpk", 2, "missing-dir")
    with _read_only_folder(tmp_path / "ro") as ro:
        r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.key", ro / "b.fpk")
        _refused(r, ro / "b.fpk", 2, str(ro))


@contextlib.contextmanager
def _read_only_folder(path: Path):
    """A folder nobody can write, root included: a read-only tmpfs when running as root (root ignores
    permission bits, and CI runs as root), mode 0500 otherwise. The check fails if the folder is writable."""
    path.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"root cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
        mounted = True
    else:
        path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            (path / "probe").write_bytes(b"x")  # the folder really is read-only
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        else:
            path.chmod(0o700)


def test_hub_id_offline(tmp_path: Path, keypair: Path) -> None:
    r = run_cli("build", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--docs", str(DEMO_DOCS), "--name", "t",
                "--sign", str(keypair / "builder.key"), "-o", str(out := _out(tmp_path)),
                env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    _refused(r, out, 2, "Qwen/Qwen2.5-0.5B-Instruct", "local")


def _with_template(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of a tiny checkpoint whose chat template is ``template`` (None: no template, as a base model)."""
    shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    if template is not None:
        tc["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (dst / extra).unlink(missing_ok=True)
    return dst


def test_no_template_and_chat_asked_is_refused_with_the_fix(tmp_path: Path, keypair: Path,
                                                            tiny_llama_dir: Path) -> None:
    model = _with_template(tiny_llama_dir, tmp_path / "base", None)
    out = _out(tmp_path)
    r = _build(model, DEMO_DOCS, keypair / "builder.key", out, "--prompt-format", "chat")
    _refused(r, out, 5, "no chat template", "--prompt-format completion")


def test_undecidable_template_is_refused_at_build_with_the_fix(tmp_path: Path, keypair: Path,
                                                                tiny_llama_dir: Path) -> None:
    model = _with_template(tiny_llama_dir, tmp_path / "broken", "{{ raise_exception('roles not supported') }}")
    out = _out(tmp_path)
    r = _build(model, DEMO_DOCS, keypair / "builder.key", out)
    _refused(r, out, 5, "cannot determine the prompt format", "roles not supported", "--prompt-format completion")


def test_unknown_prompt_format_is_a_usage_error(tmp_path: Path, keypair: Path, tiny_llama_dir: Path) -> None:
    r = _build(tiny_llama_dir, DEMO_DOCS, keypair / "builder.key", tmp_path / "b.fpk", "--prompt-format", "json")
    _one_line_error(r, 2, "prompt_format")
