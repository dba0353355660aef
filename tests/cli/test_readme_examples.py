"""The README's examples name what the code makes, so a user who copies one against the demo gets an answer."""

from __future__ import annotations

import json
from pathlib import Path
import re
import shlex

from fieldpack.cli.build import DEMO_BUNDLE_NAME

README = Path(__file__).resolve().parents[2] / "README.md"


def test_openai_api_curl_example_names_the_demo_bundle() -> None:
    section = README.read_text("utf-8").split("## In a browser, and over the OpenAI API", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the section lost its curl example"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    assert "--data-dir" in words and words[words.index("--data-dir") + 1] == "demo-out/device"
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == DEMO_BUNDLE_NAME  # the server answers 404 for any other name
    assert body["messages"][-1]["role"] == "user"
