#!/usr/bin/env bash
# Set up .venv, export the packaged models (once) and run the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/twostage demo "$@"
