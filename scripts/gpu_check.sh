#!/usr/bin/env bash
# The project's GPU check (issue 25), one script for one H100/H200 (about 8 minutes): PixArt-XL-2 1024 in fp16 with
# random weights (cost does not depend on them), 20 steps, baseline / SDTM*-a / fast() / fast() + MagCache, each
# eager and compiled (inductor max-autotune-no-cudagraphs, and reduce-overhead = CUDA graphs), the method's calls
# interleaved with the baseline's; one CSV: $OUT/gpu_check/results.csv (+ the harness's plots and table).
# Override with GPU_CHECK_MODEL, GPU_CHECK_REPEATS, GPU_CHECK_MODES (space-separated: eager and/or inductor modes),
# GPU_CHECK_STEPS, GPU_CHECK_DTYPE, GPU_CHECK_DEVICE (tests run it on the CPU with a tiny model and the eager modes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs}/gpu_check
MODEL=${GPU_CHECK_MODEL:-pixart-xl-2-1024}
REPEATS=${GPU_CHECK_REPEATS:-5}
STEPS=${GPU_CHECK_STEPS:-20}
DTYPE=${GPU_CHECK_DTYPE:-float16}
MODES=${GPU_CHECK_MODES:-eager max-autotune-no-cudagraphs reduce-overhead}
FAST=$("$PY" -c "from benchmarks.methods import config_spec; from sdtm_plugin import SDTMConfig; print(config_spec('sdtm', SDTMConfig.fast()))")
COMPOSED="sdtm+magcache:${FAST#sdtm:},cache.threshold=0.06"
device=()
if [ -n "${GPU_CHECK_DEVICE:-}" ]; then device=(--device "$GPU_CHECK_DEVICE"); fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
for mode in $MODES; do
  compile=()
  case "$mode" in
    eager) ;;
    eager-backend) compile=(--compile eager) ;;  # dynamo without inductor (CPU tests of this script)
    *) compile=(--compile "inductor:$mode") ;;
  esac
  "$PY" -m benchmarks --model "$MODEL" --dtype "$DTYPE" --steps "$STEPS" --repeats "$REPEATS" --warmup 2 \
    --quality-prompts 0 --no-samples --out "$OUT" "${device[@]}" "${compile[@]}" \
    --method baseline sdtm "$FAST" "$COMPOSED"
done
"$PY" - "$OUT" <<'PYEOF'
import sys, pandas as pd
table = pd.read_csv(f"{sys.argv[1]}/results.csv")
cols = ["compile", "label", "macs_speedup", "denoiser_ms", "speedup_denoiser", "speedup_denoiser_paired",
        "peak_memory_MB", "psnr_db"]
print(table[cols].to_string(index=False))
PYEOF
