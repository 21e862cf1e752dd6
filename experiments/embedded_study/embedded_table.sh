#!/usr/bin/env bash
# The embedded benchmark: CovMatch-100 against random / herding / k-center coresets of 100 pairs
# and full-data training, on the embedded dataset's test split with the `demo` preset, RUNS training runs
# each (seeds 0..RUNS-1), every step timed. Writes OUT/table.md (the README's table), OUT/times.txt and
# OUT/comparison.png.
#
#   bash benchmarks/embedded_table.sh OUT [RUNS=3] [FULL_EPOCHS=1]
#
# Two lanes run side by side, one thread each (lane 1: distil, evaluate CovMatch, full data; lane 2: random,
# herding, k-center), so every time in times.txt is one core's wall time. Full-data training uses
# FULL_EPOCHS epochs over all 50,000 train captions (500 steps per epoch) instead of the protocol's 100;
# the 100-pair sets use the preset's 100 epochs (100 steps). An evaluation whose OUT/eval-NAME/results.json
# already exists is kept, not rerun (copy a finished eval-full/ in to skip the longest step).
set -euo pipefail
out=${1:?usage: embedded_table.sh OUT [RUNS] [FULL_EPOCHS]}
runs=${2:-3}
full_epochs=${3:-1}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
: >"$out/times.txt"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
pin() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
step() {  # step CORE NAME COMMAND...: run on CORE, log to OUT/NAME.log, record wall seconds
  local core=$1 name=$2
  shift 2
  if [ "$name" != distill ] && [ -f "$out/eval-$name/results.json" ]; then  # kept from an earlier run
    echo "$name reused $out/eval-$name/results.json (its own time is in that file)" | tee -a "$out/times.txt"
    return 0
  fi
  local start=$SECONDS
  pin "$core" "$@" >"$out/$name.log" 2>&1 || { echo "step $name failed; see $out/$name.log" >&2; return 1; }
  echo "$name $((SECONDS - start))" | tee -a "$out/times.txt"
}
eval_args=(--preset demo --runs "$runs" --no-progress)
lane1() {
  step 0 distill $py -m covmatch.distill --preset demo --num-pairs 100 --out "$out/distill" --overwrite --no-progress
  step 0 covmatch $py -m covmatch.eval "${eval_args[@]}" --synthetic "$out/distill" --out "$out/eval-covmatch"
  step 0 full $py -m covmatch.eval "${eval_args[@]}" --coreset full --epochs "$full_epochs" --out "$out/eval-full"
}
lane2() {
  for method in random herding kcenter; do
    step 1 "$method" $py -m covmatch.eval "${eval_args[@]}" --coreset "$method" --num-pairs 100 \
      --out "$out/eval-$method"
  done
}
lane1 & pid1=$!
lane2 & pid2=$!
wait $pid1 && wait $pid2
$py -m covmatch.eval --compare "$out"/eval-{covmatch,random,herding,kcenter,full} --out "$out" >"$out/table.md"
cat "$out/table.md" "$out/times.txt"
