#!/usr/bin/env bash
# The embedded benchmark (issue #5): CovMatch-100 against random / herding / k-center coresets of 100 pairs
# and full-data training, on the embedded dataset's test split with the `demo` preset, RUNS training runs
# each (seeds 0..RUNS-1), every step timed. Writes OUT/table.md (the README's table) and OUT/comparison.png.
#
#   bash benchmarks/embedded_table.sh OUT [RUNS=3] [FULL_EPOCHS=2]
#
# Full-data training uses FULL_EPOCHS epochs over all 50,000 train captions instead of the protocol's 100
# (about 2-3 minutes per epoch on a 2-core CPU); the 100-pair sets use the preset's 100 epochs.
set -euo pipefail
out=${1:?usage: embedded_table.sh OUT [RUNS] [FULL_EPOCHS]}
runs=${2:-3}
full_epochs=${3:-2}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
: >"$out/times.txt"
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record wall seconds
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1 || { echo "step $name failed; see $out/$name.log" >&2; exit 1; }
  echo "$name $((SECONDS - start))" | tee -a "$out/times.txt"
}
step distill $py -m covmatch.distill --preset demo --num-pairs 100 --out "$out/distill" --overwrite --no-progress
step covmatch $py -m covmatch.eval --preset demo --synthetic "$out/distill" --runs "$runs" --no-progress \
  --out "$out/eval-covmatch"
for method in random herding kcenter; do
  step "$method" $py -m covmatch.eval --preset demo --coreset "$method" --num-pairs 100 --runs "$runs" \
    --no-progress --out "$out/eval-$method"
done
step full $py -m covmatch.eval --preset demo --coreset full --runs "$runs" --epochs "$full_epochs" --no-progress \
  --out "$out/eval-full"
$py -m covmatch.eval --compare "$out"/eval-{covmatch,random,herding,kcenter,full} --out "$out" >"$out/table.md"
cat "$out/table.md"
