#!/usr/bin/env bash
# Follow-up GPU run: profile one step of modpo and TRL at 0.5b, then the padding-free lever (with and without the
# chunked LM head), and the 1.5b shape with padding-free against TRL. Usage: bash benchmarks/gpu_profile.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench-results}}; mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export MODPO_CACHE=/tmp/modpo-bench-cache TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-8}; WARMUP=${WARMUP:-3}
run() { local name=$1 shape=$2; shift 2; echo "=== $name"
  timeout "${RUN_TIMEOUT:-100}" "$PY" benchmarks/throughput.py --shape "$shape" --steps "$STEPS" --warmup "$WARMUP" \
    --model-dir "/tmp/modpo-bench-models/$shape" --label "$name" --out "$OUTDIR/$name.json" "$@" 2>&1 \
    | grep -v -E "Warning|warnings.warn|^\{'train_runtime'"; }
run p05b 0.5b --profile
run pf05b 0.5b --which modpo --modpo-set padding_free=true
run pf_nochunk05b 0.5b --which modpo --modpo-set padding_free=true --no-modpo-chunked-logps
run pf15b 1.5b --modpo-set padding_free=true
"$PY" benchmarks/summarize.py "$OUTDIR"/*.json
