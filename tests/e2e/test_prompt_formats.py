"""A model whose chat template refuses a system role (Gemma's and some Mistral templates) and a base model
without a chat template both build, install and answer through the real CLI, without a traceback: the prompt
format is decided at build time, recorded in the manifest, shown by inspect, and the install check renders the
real prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builder.test_build_cli import _with_template
from tests.conftest import DEMO_DOCS, run_cli

pytestmark = pytest.mark.slow

# ChatML turns (the tiny model's special tokens), but a system turn is refused, as Gemma's template does
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.mark.parametrize("template,expected", [(NO_SYSTEM_TEMPLATE, "chat-no-system"), (None, "completion")],
                         ids=["no-system-role", "no-template"])
def test_builds_installs_and_answers(tmp_path: Path, e2e_keys: Path, tiny_llama_dir: Path,
                                     template: str | None, expected: str) -> None:
    model = _with_template(tiny_llama_dir, tmp_path / "model", template)
    out = tmp_path / "t.fpk"
    r = run_cli("build", "--model", str(model), "--docs", str(DEMO_DOCS), "--name", "t", "--sign",
                str(e2e_keys / "builder.key"), "-o", str(out), "--n-ctx", "1024", "--max-tokens", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert m["runtime"]["prompt_format"] == expected
    if expected == "completion":
        assert "{question}" in m["runtime"]["completion_template"] and "\nQuestion:" in m["runtime"]["stop"]
    shown = run_cli("inspect", str(out)).stdout
    assert "prompt format" in shown
    dev = tmp_path / "device"
    assert run_cli("device", "init", "--data-dir", str(dev), "--trust", str(e2e_keys / "builder.pub")).returncode == 0
    r = run_cli("install", str(out), "--data-dir", str(dev))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("ask", QUESTION, "--data-dir", str(dev), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    a = json.loads(r.stdout)
    assert not a["abstained"] and a["sources"][0]["source"] == "database.md"
    assert a["timings"]["completion_tokens"] > 0
