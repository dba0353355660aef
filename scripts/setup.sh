#!/usr/bin/env bash
# One-time (idempotent) set-up of a development/build machine: a virtual environment in .venv with
# fieldpack and every extra (builder, device, dev). llama-cpp-python compiles from source the first time
# (about 12 minutes on 2 cores; pip caches the wheel afterwards). With --broker it also installs Mosquitto
# for the MQTT tests and Chromium with its WebDriver for the page test (Debian/Ubuntu, needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: fieldpack needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1)). Fix: set PYTHON=python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fieldpack-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  # torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--broker" ]; then
  need=""
  command -v mosquitto >/dev/null 2>&1 || need="$need mosquitto mosquitto-clients"
  command -v chromium >/dev/null 2>&1 || need="$need chromium"
  command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
  # real documentation the retrieval, compression and eval tests read (Debian's HTML docs)
  [ -d /usr/share/doc/postgresql-doc-15/html ] || need="$need postgresql-doc-15"
  [ -d /usr/share/doc/debian-handbook/html ] || need="$need debian-handbook"
  [ -f /usr/share/doc/sqlite3/lang_vacuum.html ] || need="$need sqlite3-doc"
  if [ -n "$need" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
  fi
fi
