#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most 10 minutes on one H100 or H200:
#   1. pytest -m gpu                                  (the CUDA tests)
#   2. bench/bench_pipeline.py on configs/bench-realsize.yaml (7B-shaped LLM + SD-1.5-shaped generator,
#      random weights): s/image, batch-8 img/s, peak GPU memory -> bench/results/pipeline-cuda-realsize.json
#   3. bench/gpu_realsize.py: the real-size NExT-GPT chain (7B-shaped stand-ins written, converted, loaded
#      text-only on CUDA and generated from) in fp16 and bf16, against transformers + peft
#      -> bench/results/realsize-cuda.json
# Each step has its own time limit so that one slow step cannot eat the others'; the log of every step
# goes to bench/results/gpu_check.log (and to $OUT when the device tool provides it, so it comes back).
#
#   bash bench/gpu_check.sh            # from the repository root, on the GPU machine
set -u
cd "$(dirname "$0")/.."
RESULTS=bench/results
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$LOG"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
step "pytest -m gpu" 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step "pipeline benchmark (bench-realsize)" 150 "$PY" bench/bench_pipeline.py --config configs/bench-realsize.yaml \
    --device cuda --repeats 3 --batch 8 --steps 20 --out "$RESULTS/pipeline-cuda-realsize.json"
step "real-size NExT-GPT chain, fp16 and bf16" 330 "$PY" bench/gpu_realsize.py --dtypes float16,bfloat16 \
    --out "$RESULTS/realsize-cuda.json"
tail -n 30 "$LOG"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp "$LOG" "$RESULTS"/pipeline-cuda-realsize.json "$RESULTS"/realsize-cuda.json "$OUT"/ 2>/dev/null
fi
exit $status
