#!/usr/bin/env bash
# Set up .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python scripts/gen_protos.py --check
# TODO(habits): enable once server/ and client/ are clean under ruff and mypy (export/ and model/ are, and
# tests/test_lint.py keeps them so); until then `./scripts/lint.sh` reports what is left there.
# ./scripts/lint.sh
exec .venv/bin/python -m pytest -q "$@"
