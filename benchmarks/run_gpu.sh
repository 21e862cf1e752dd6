#!/usr/bin/env bash
# The whole GPU benchmark suite in one go, for a bare H200 machine with no network (torch, triton, timm and
# transformers preinstalled). Packages it lacks travel as wheels in ./wheels (see README "Benchmarks").
#   bash benchmarks/run_gpu.sh            # writes CSVs and PNGs to $OUT (default: benchmarks/results)
# Budget: under 8 minutes. Smoke-test it on CPU with COVMATCH_BENCH_SMOKE=1 (tiny shapes, interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export COVMATCH_BENCH_RESULTS="$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ -d wheels ]; then "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl || true; fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD:${PYTHONPATH:-}"

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/environment.txt"

# 1. correctness on the device, bf16 included (fast: single tile config)
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_loss.py -k "triton or forms" \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt" || true
# 2. kernel microbenchmarks (autotuned) and 3. the distillation step
timeout 240 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_loss.py --benchmark-enable 2>&1 | tail -3 || true
timeout 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_step.py --benchmark-enable 2>&1 | tail -3 || true
"$PY" -m benchmarks.plot "$OUT" || true
ls -la "$OUT"
