#!/usr/bin/env bash
# One-GPU benchmark run: the layout check, then modpo (as configured, padding-free, prefix sharing) vs TRL at the 0.5b
# and 1.5b shapes, then modpo lever on/off rows at 0.5b, then the reference-log-prob precompute. About 8-10 minutes
# on an H100 (RUN_TIMEOUT bounds each run).
#
#   bash benchmarks/gpu_run.sh OUTDIR            # OUTDIR defaults to $OUT, else /tmp/modpo-bench-results
#
# Needs torch (CUDA), transformers, accelerate, peft. trl and datasets (+ dill, multiprocess) may come as wheels in
# $WHL_DIR (default .whl at the repository root; fill it with benchmarks/fetch_wheels.sh). modpo itself is used
# from src/ (no install needed).
#
# Files written to OUTDIR (8 with the defaults): 05b.json 15b.json lever_nochunk.json lever_fused.json
# lever_gradckpt.json lever_compile.json precompute_05b.json gpu_run.log.
# BUNDLE=1 keeps the per-run JSON in $RUNS_DIR instead and writes only all.json, summary.md and gpu_run.log to OUTDIR
# (for transports that return few files).
#
# Knobs (environment): PYTHON (python3), STEPS (12), WARMUP (4), PAIRS (8), RUN_TIMEOUT (s per run, 240),
# MODELS (/tmp/modpo-bench-models: saved random models, reused between runs), EXTRA_MODPO_SETS (space-separated
# KEY=VALUE MODPOConfig settings, one extra modpo-only 0.5b row each, e.g. "padding_free=true"), SKIP_LEVERS=1,
# SKIP_15B=1, SKIP_PRECOMPUTE=1, CPU_SMOKE=1 (check this script without a GPU: tiny shape, --cpu, few steps).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${1:-${OUT:-/tmp/modpo-bench-results}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
SMOKE=${CPU_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  STEPS=${STEPS:-4}; WARMUP=${WARMUP:-1}; S05=tiny; S15=tiny; CPU=(--cpu)
else
  STEPS=${STEPS:-12}; WARMUP=${WARMUP:-4}; S05=0.5b; S15=1.5b; CPU=()
fi
PAIRS=${PAIRS:-8}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
MODELS=${MODELS:-/tmp/modpo-bench-models}
WHL_DIR=${WHL_DIR:-.whl}
if [ "${BUNDLE:-0}" = 1 ]; then RUNS_DIR=${RUNS_DIR:-/tmp/modpo-bench-runs}; else RUNS_DIR=$OUTDIR; fi
mkdir -p "$RUNS_DIR" "$MODELS"
LOG=$OUTDIR/gpu_run.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

if compgen -G "$WHL_DIR/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL_DIR"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO/src:$REPO/benchmarks:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_DISABLE=1 MODPO_CACHE=/tmp/modpo-bench-cache CPU_SMOKE=$SMOKE

"$PY" - <<'PYEOF' || { echo "preflight failed: missing packages or no GPU"; exit 1; }
import torch, transformers, accelerate, datasets, trl, modpo
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| accelerate", accelerate.__version__, "| datasets", datasets.__version__, "| trl", trl.__version__,
      "| modpo", modpo.__file__)
import os
if os.environ.get("CPU_SMOKE") != "1":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0))
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

START=$SECONDS
run() {  # run NAME SHAPE [throughput args...]
  local name=$1 shape=$2; shift 2
  echo
  echo "=== $name ($shape) $* [t=$((SECONDS - START))s]"
  timeout "$RUN_TIMEOUT" "$PY" benchmarks/throughput.py --shape "$shape" --steps "$STEPS" --warmup "$WARMUP" \
    --pairs-per-step "$PAIRS" --model-dir "$MODELS/$shape" --label "$name" --out "$RUNS_DIR/$name.json" \
    ${CPU[@]+"${CPU[@]}"} "$@" \
    2>&1 | grep -v -E "^\{'train_runtime'|it/s\]$|Warning: |warnings.warn"
  echo "--- $name exit ${PIPESTATUS[0]}"
}

# Do padded, padding-free and prefix-sharing batches give the same log-probs and gradients on this device?
echo "=== layout_check [t=$((SECONDS - START))s]"
timeout "$RUN_TIMEOUT" "$PY" benchmarks/layout_check.py ${CPU[@]+--device cpu} 2>&1 | grep -v -E "Warning: |warnings.warn"
echo "--- layout_check exit ${PIPESTATUS[0]}"

# modpo (default levers, padding-free, prefix sharing) vs TRL, all in one run per shape
VARIANTS=(--modpo-variant padding_free:padding_free=true --modpo-variant prefix_sharing:prefix_sharing=true)
run 05b "$S05" "${VARIANTS[@]}"
for kv in ${EXTRA_MODPO_SETS:-}; do
  run "lever_set_${kv%%=*}" "$S05" --which modpo --modpo-set "$kv"
done
[ "${SKIP_15B:-0}" = 1 ] || run 15b "$S15" "${VARIANTS[@]}"

# modpo lever on/off rows at 0.5b (compare each with the modpo row of 05b)
if [ "${SKIP_LEVERS:-0}" != 1 ]; then
  run lever_nochunk "$S05" --which modpo --no-modpo-chunked-logps
  run lever_fused "$S05" --which modpo --optim adamw_torch_fused
  run lever_gradckpt "$S05" --which modpo --gradient-checkpointing
  [ "$SMOKE" = 1 ] || run lever_compile "$S05" --which modpo --torch-compile  # compiling on CPU takes minutes
fi
if [ "${SKIP_PRECOMPUTE:-0}" != 1 ]; then
  echo
  echo "=== precompute_05b [t=$((SECONDS - START))s]"
  timeout "$RUN_TIMEOUT" "$PY" benchmarks/precompute.py --shape "$S05" --model-dir "$MODELS/$S05" \
    --out "$RUNS_DIR/precompute_05b.json" ${CPU[@]+"${CPU[@]}"} 2>&1 | grep -v -E "Warning: |warnings.warn"
  echo "--- precompute_05b exit ${PIPESTATUS[0]}"
fi

echo
echo "=== summary [t=$((SECONDS - START))s]"
if [ "${BUNDLE:-0}" = 1 ]; then
  "$PY" benchmarks/summarize.py "$RUNS_DIR"/*.json --bundle "$OUTDIR/all.json" | tee "$OUTDIR/summary.md"
else
  "$PY" benchmarks/summarize.py "$RUNS_DIR"/*.json
fi
