"""End-to-end fixtures live in tests/conftest.py (shared with the MQTT and eval tests); re-exported here for
modules that import the helpers by this path."""

from tests.conftest import DEMO_DOCS, REPO, run_cli  # noqa: F401
