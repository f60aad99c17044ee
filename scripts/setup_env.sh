#!/usr/bin/env bash
# Install the project and its dependencies into the current Python.
# Usage: scripts/setup_env.sh [extras]   (extras: test, bench, demos; comma-separated)
#
# torch is installed first, pinned, when missing: an unpinned torch (or one pulled in by diffusers/accelerate) would
# fetch the newest release. What `torch==2.13.0` resolves to depends on the machine's package indexes: on a plain
# PyPI Linux machine it is the CUDA build (several GB); set SDTM_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# to take the CPU-only wheel instead. A machine that already has torch (CPU or CUDA) keeps it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  index=()
  if [ -n "${SDTM_TORCH_INDEX_URL:-}" ]; then
    index=(--index-url "$SDTM_TORCH_INDEX_URL")
  fi
  "$PY" -m pip install --quiet "${index[@]}" "torch==${SDTM_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
