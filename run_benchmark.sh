#!/usr/bin/env bash
# Fresh machine -> installed project -> the benchmark. With no arguments, on CPU: the shipped trained model
# (pixart-shapes; baseline, ToMe and SDTM with speed-up and image quality), several minutes; with a GPU: full-size
# PixArt-XL-2 at 512 and 1024 px in fp16 with a ratio sweep.
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
