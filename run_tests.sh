#!/usr/bin/env bash
# Fresh machine -> installed project -> the whole test suite (CPU, offline, a few minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup_env.sh test,bench,demos
exec "${PYTHON:-python3}" -m pytest -q "$@"
