#!/usr/bin/env bash
# Tune the demo preset's distillation hyperparameters on the embedded dataset's *val* split (never test).
#
#   bash benchmarks/tune_demo.sh OUT_DIR [NAME=FLAGS ...]
#
# Each NAME=FLAGS distils with `covmatch-distill --preset demo FLAGS` and scores the result with
# EVAL_RUNS evaluation runs on val (default 3: one run's seed noise, ~3 points, is as large as the
# effects); `random`, `herding`, `kcenter` and `init` (the iteration-0 set, i.e. the real pairs
# distillation starts from) are the references. Prints one line per config: name, val mean recall, seconds.
set -euo pipefail
out=${1:?usage: tune_demo.sh OUT_DIR [NAME=FLAGS ...]}
shift
py=${PYTHON:-.venv/bin/python}
runs=${EVAL_RUNS:-3}
mkdir -p "$out"
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  configs=("random=" "init=--iterations 0" "default=")
fi
for item in "${configs[@]}"; do
  name=${item%%=*}
  flags=${item#*=}
  dir="$out/$name"
  start=$(date +%s)
  if [ -f "$dir/eval/results.json" ]; then
    :
  elif [[ $name =~ ^(random|herding|kcenter)$ ]]; then
    $py -m covmatch.eval --preset demo --coreset "$name" --split val --runs "$runs" --no-progress --out "$dir/eval" $flags \
      >"$dir.log" 2>&1
  else
    # shellcheck disable=SC2086
    $py -m covmatch.distill --preset demo --out "$dir/distill" --overwrite --no-progress $flags >"$dir.log" 2>&1
    $py -m covmatch.eval --preset demo --synthetic "$dir/distill" --split val --runs "$runs" --no-progress \
      --out "$dir/eval" >>"$dir.log" 2>&1
  fi
  mean=$($py -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']['mean']; print(f\"{s['mean']:.2f}+-{s['std']:.2f}\")" \
    "$dir/eval/results.json")
  echo "$name val_mean=$mean runs=$runs seconds=$(( $(date +%s) - start )) flags=[$flags]" | tee -a "$out/summary.txt"
done
