#!/usr/bin/env bash
# The whole GPU benchmark suite in one go, for a bare GPU machine with no network where torch, triton, timm,
# transformers, pytest(-benchmark), nvidia-ml-py and matplotlib are preinstalled (as on the H200 image).
# What it lacks travels in .gpu_carry/ (made here by benchmarks/prepare_gpu_carry.sh): DeepSpeed and its
# requirements as wheels, and a tokenizer + config for the randomly initialised BERT-base-shaped encoder.
#
#   bash benchmarks/run_gpu.sh        # OUT=dir (default benchmarks/results/gpu), CARRY=dir (default .gpu_carry)
#
# It writes eight files to $OUT (the most the device machine returns): run_gpu.log, loss.csv, host.csv,
# step.csv, step_scaling.csv, loss.png, step.png and summary.md (the README's table, every target marked
# met / missed / not measured).
# Budget: under 9 minutes. Each stage has its own time limit and runs its cases in order of importance, and
# every case appends its CSV row when it finishes, so a stage cut short keeps what it measured (the log says so).
# Check the script itself on a CPU first (smoke mode: tiny shapes, the Triton interpreter, no timing claims):
#   COVMATCH_BENCH_SMOKE=1 TRITON_INTERPRET=1 OUT=/tmp/gpu-smoke bash benchmarks/run_gpu.sh
# RUN_GPU_TESTS_K / RUN_GPU_BENCH_K replace the pytest -k selections of the correctness and benchmark stages;
# RUN_GPU_LIMITS="45 45 20 220 50 120" are the six stages' time limits in seconds (correctness of the kernels,
# loss, host, step, data, CUDA graphs against eager; 0 skips a stage): 500 s in all, so that the whole script
# fits one 10-minute device call with its set-up;
# RUN_GPU_AUTOTUNE=1 makes the loss stage time every tile configuration (COVMATCH_TRITON_AUTOTUNE=1; its
# choices land in loss.csv's tile_configs) while the host and step stages keep the deterministic defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
CARRY="${CARRY:-.gpu_carry}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COVMATCH_BENCH_RESULTS="$OUT"
export COVMATCH_BENCH_RUN="${COVMATCH_BENCH_RUN:-$(date -u +%Y%m%dT%H%M%S)}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
START=$SECONDS
stage() { echo; echo "=== $1 ($((SECONDS - START)) s in)"; }
limited() {  # limited SECONDS CMD...: run CMD, say in the log when the time limit cut it short
  local limit=$1
  shift
  if [ "$limit" = 0 ]; then echo "(skipped: time limit 0)"; return 0; fi
  # SIGINT, not SIGTERM: pytest then still prints the failures it has seen (tracebacks, short summary)
  timeout -s INT -k 10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "!!! time limit of $limit s reached: this stage is incomplete"; fi
  return 0
}

read -r LIMIT_TESTS LIMIT_LOSS LIMIT_HOST LIMIT_STEP LIMIT_DATA LIMIT_GRAPHS <<<"${RUN_GPU_LIMITS:-45 45 20 220 50 120}"
LIMIT_DATA="${LIMIT_DATA:-50}"
LIMIT_GRAPHS="${LIMIT_GRAPHS:-120}"
if [ "${COVMATCH_BENCH_SMOKE:-auto}" = 1 ]; then
  DATA_ARGS=(--preset tiny --jpegs 24 --batches 2 --real-batch 8 --workers 0)
else
  DATA_ARGS=(--preset paper --jpegs 1500 --batches 20)
fi
BENCH_K=()
if [ -n "${RUN_GPU_BENCH_K:-}" ]; then BENCH_K=(-k "$RUN_GPU_BENCH_K"); fi

main() {
stage "set-up"
if [ -d "$CARRY/wheels" ]; then
  SITE=/tmp/covmatch-carry-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/wheels/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$CARRY/text-encoder" ]; then export COVMATCH_BENCH_TEXT_ENCODER="$PWD/$CARRY/text-encoder"; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "timm", "deepspeed", "pytest_benchmark", "pynvml", "covmatch"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # report and go on: the stage that needs it says what failed
        print(name, "NOT IMPORTABLE:", type(err).__name__, err)
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

stage "1. correctness of the fused kernels on this device (fp32, fp16, bf16) against float64"
limited "$LIMIT_TESTS" "$PY" -m pytest -q -x -p no:cacheprovider --tb=short -rfE tests/test_loss.py -k "${RUN_GPU_TESTS_K:-triton or forms}"

BENCH_ARGS=(--benchmark-enable --benchmark-disable-gc --benchmark-columns=median,iqr,rounds "${BENCH_K[@]}")
stage "2. covmatch_loss microbenchmarks"
COVMATCH_TRITON_AUTOTUNE="${RUN_GPU_AUTOTUNE:-0}" limited "$LIMIT_LOSS" \
  "$PY" -m pytest -q -p no:cacheprovider --tb=short -rfE benchmarks/bench_loss.py "${BENCH_ARGS[@]}"

stage "2b. host cost of one loss call"
COVMATCH_TRITON_AUTOTUNE=0 limited "$LIMIT_HOST" \
  "$PY" -m pytest -q -p no:cacheprovider --tb=short -rfE benchmarks/bench_host.py "${BENCH_ARGS[@]}"

stage "2c. real-data path: decoding JPEGs against the decoded cache (images/s, in this log)"
limited "$LIMIT_DATA" "$PY" -m benchmarks.bench_data "${DATA_ARGS[@]}" --compare \
  --make-jpegs "/tmp/covmatch-bench-jpegs-${DATA_ARGS[1]}" --text-encoder "${COVMATCH_BENCH_TEXT_ENCODER:-all-MiniLM-L6-v2}"

stage "2d. --compile --cuda-graphs distils what eager does (tiny preset, fp32, --syn-chunk; no graph skipped)"
limited "$LIMIT_GRAPHS" "$PY" -m pytest -q -x -p no:cacheprovider --tb=short -rfEs tests/test_compiled_step.py -k on_a_gpu

stage "3. distillation step (both batches on the device before the timer starts)"
COVMATCH_TRITON_AUTOTUNE=0 limited "$LIMIT_STEP" "$PY" -m pytest -q -p no:cacheprovider --tb=short -rfE benchmarks/bench_step.py "${BENCH_K[@]}"

stage "4. plots and summary"
if [ -f "$OUT/step_profiles.tmp" ]; then cat "$OUT/step_profiles.tmp"; fi  # each step case's top ops and kernels
"$PY" -m benchmarks.plot "$OUT"
"$PY" -m benchmarks.summarize "$OUT" | tee "$OUT/summary.md"
rm -f "$OUT"/*.tmp
stage "done"
ls -la "$OUT"
}

main 2>&1 | tee -a "$OUT/run_gpu.log"
