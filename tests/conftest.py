"""Session fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

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
