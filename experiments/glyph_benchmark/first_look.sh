#!/usr/bin/env bash
# A first, untuned look at CovMatch on the glyph scenes (val only): one distillation with the demo's settings
# (its regime: fixed pretrained model; 150 iterations, lr_img 30), its set and its iteration-0 set (random
# real pairs) evaluated 3 times each. Finished outputs are kept; run from the repository root.
set -euo pipefail
out=experiments/glyph_benchmark/results/first_look
py=${PYTHON:-.venv/bin/python}
if [ ! -f "$out/set/synthetic.safetensors" ]; then
  $py -m covmatch.distill --preset glyphs --out "$out/set" --auto-resume --no-progress --seed 0 --save-every 50 \
    --iterations 150 --lr-img 30
fi
for seed in 0 1 2; do
  pids=()
  for what in set set/initial; do
    name=$(echo "$what" | tr / -)-$seed
    if [ ! -f "$out/evals/$name/results.json" ]; then
      OMP_NUM_THREADS=1 $py -m covmatch.eval --preset glyphs --synthetic "$out/$what" --split val --seed "$seed" \
        --runs 1 --out "$out/evals/$name" --overwrite --no-progress &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # a failed evaluation stops the script
done
