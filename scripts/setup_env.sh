#!/usr/bin/env bash
# Install the project and its dependencies into the current Python.
# Usage: scripts/setup_env.sh [extras]   (extras: test, bench, demos; comma-separated)
#
# torch is installed first, pinned, when missing: an unpinned torch (or one pulled in by diffusers/accelerate) would
# fetch the newest release. What `torch==2.13.0` resolves to depends on the machine's package indexes: on a plain
# PyPI Linux machine it is the CUDA build (several GB); set SDTM_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# to take the CPU-only wheel instead. A machine that already has torch (CPU or CUDA) keeps it.
#
# The install is skipped when this Python already has the project installed from this checkout with the same
# packaging files and extras (a stamp file records them), so repeated runs start at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
stamp_file=${SDTM_SETUP_STAMP:-.setup-stamp}
stamp="$("$PY" -c 'import sys; print(sys.executable)') $extras $(cat setup.cfg pyproject.toml | sha1sum | cut -c1-16)"
if [ -f "$stamp_file" ] && grep -qxF "$stamp" "$stamp_file" \
    && "$PY" -c "import torch, sdtm_plugin, benchmarks, token_modules" >/dev/null 2>&1; then
  exit 0
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  index=()
  if [ -n "${SDTM_TORCH_INDEX_URL:-}" ]; then
    index=(--index-url "$SDTM_TORCH_INDEX_URL")
  fi
  "$PY" -m pip install --quiet "${index[@]}" "torch==${SDTM_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
echo "$stamp" >> "$stamp_file"
