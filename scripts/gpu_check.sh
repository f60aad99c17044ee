#!/usr/bin/env bash
# The project's GPU check (issues 25 and 42), one script for one H100/H200, random weights (cost does not depend on
# them), the methods' calls interleaved with the baseline's, peak memory per row; one CSV:
# $OUT/gpu_check/results.csv (+ the harness's plots and table).
#   - PixArt-XL-2 1024 (fp16, 20 steps): eager, whole-model inductor (max-autotune-no-cudagraphs) and CUDA graphs
#     (reduce-overhead);
#   - FLUX.1-dev 1024^2 and Wan2.1-1.3B 480p (bf16, 8 and 6 steps): eager and regional compilation
#     (`compile_repeated_blocks`, max-autotune-no-cudagraphs), as their users run them.
# Methods: baseline, SDTM*-a, fast(), ToMe 0.5 and fast() composed with a step cache (MagCache on PixArt,
# FirstBlockCache on FLUX / Wan). A step cache decides from values: on random weights its skips are not those of
# a trained model, so the composed row is a timing of the merge path with whatever the cache skipped, not a cache
# timing (its skips are in the CSV's token counts).
# Budget (estimated from the MAC counts, not yet run on a GPU): PixArt ~3 min, FLUX ~2.5 min, Wan ~2.5 min.
# Override with GPU_CHECK_MODELS, GPU_CHECK_REPEATS, GPU_CHECK_MODES (space-separated: eager, an inductor mode,
# regional:MODE; eager-backend and regional-eager-backend run dynamo without inductor), GPU_CHECK_STEPS,
# GPU_CHECK_DTYPE, GPU_CHECK_DEVICE (tests run it on the CPU with tiny models and the eager modes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs}/gpu_check
MODELS=${GPU_CHECK_MODELS:-pixart-xl-2-1024 flux-dev wan2.1-1.3b-480p}
FAST=$("$PY" -c "from benchmarks.methods import config_spec; from sdtm_plugin import SDTMConfig; print(config_spec('sdtm', SDTMConfig.fast()))")
device=()
if [ -n "${GPU_CHECK_DEVICE:-}" ]; then device=(--device "$GPU_CHECK_DEVICE"); fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
for model in $MODELS; do
  family=$("$PY" -c "from benchmarks.models import PRESETS; print(PRESETS['$model'].family)")
  case "$family" in
    flux|wan)
      default_modes="eager regional:max-autotune-no-cudagraphs"; default_steps=8; default_dtype=bfloat16
      composed="sdtm+fbcache:${FAST#sdtm:},cache.threshold=0.1"
      if [ "$family" = wan ]; then default_steps=6; fi ;;
    *)
      default_modes="eager max-autotune-no-cudagraphs reduce-overhead"; default_steps=20; default_dtype=float16
      composed="sdtm+magcache:${FAST#sdtm:},cache.threshold=0.06" ;;
  esac
  for mode in ${GPU_CHECK_MODES:-$default_modes}; do
    compile=()
    case "$mode" in
      eager) ;;
      eager-backend) compile=(--compile eager) ;;  # dynamo without inductor (CPU tests of this script)
      regional-eager-backend) compile=(--compile eager --regional) ;;
      regional:*) compile=(--compile "inductor:${mode#regional:}" --regional) ;;
      *) compile=(--compile "inductor:$mode") ;;
    esac
    "$PY" -m benchmarks --model "$model" --dtype "${GPU_CHECK_DTYPE:-$default_dtype}" \
      --steps "${GPU_CHECK_STEPS:-$default_steps}" --repeats "${GPU_CHECK_REPEATS:-3}" --warmup 2 \
      --quality-prompts 0 --no-samples --out "$OUT" "${device[@]}" "${compile[@]}" \
      --method baseline sdtm "$FAST" tome "$composed"
  done
done
"$PY" - "$OUT" <<'PYEOF'
import sys, pandas as pd
table = pd.read_csv(f"{sys.argv[1]}/results.csv")
cols = ["model", "compile", "label", "macs_speedup", "denoiser_ms", "speedup_denoiser", "speedup_denoiser_paired",
        "peak_memory_MB", "psnr_db"]
print(table[cols].to_string(index=False))
PYEOF
