#!/usr/bin/env bash
# Fresh machine -> installed project -> the benchmark. With no arguments: the embedded default (pixart-small, a
# random-weight PixArt with PixArt-XL-2-512's 1024 tokens; baseline, ToMe and SDTM) on CPU, a few minutes.
# Arguments go to `python -m benchmarks` (see --help). With several GPUs, one process per GPU via accelerate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup_env.sh bench
PY=${PYTHON:-python3}
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
  exec "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --num_machines 1 \
    --mixed_precision no --dynamo_backend no -m benchmarks "$@"
fi
exec "$PY" -m benchmarks "$@"
