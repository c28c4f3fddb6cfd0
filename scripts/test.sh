#!/usr/bin/env bash
# Set up .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python scripts/gen_protos.py --check
# ruff and mypy over server/ export/ client/ model/ run inside the suite (tests/test_lint.py -> scripts/lint.sh).
exec .venv/bin/python -m pytest -q "$@"
