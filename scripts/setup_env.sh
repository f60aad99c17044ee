#!/usr/bin/env bash
# Install the project and its dependencies into the current Python, without pulling CUDA wheels on a CPU machine.
# Usage: scripts/setup_env.sh [extras]   (extras: test, bench, demos; comma-separated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
# torch first and pinned when missing: an unpinned torch (or one pulled in by diffusers/accelerate) would fetch the
# newest CUDA build (several GB). A machine that already has torch (CPU or CUDA) keeps it: setup.cfg only asks >=2.1.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${SDTM_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
