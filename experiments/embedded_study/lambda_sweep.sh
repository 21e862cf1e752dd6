#!/usr/bin/env bash
# Does the mean term act? Distil the demo preset with lam in {0, 0.1, 1, 10} (--normalize-loss, one common scale
# per reset, so lam weighs the raw terms' ratio) and measure each set's feature-mean gaps against 2,048 real
# pairs at the pretrained encoders (covmatch analyze). Resumable: finished runs and analyses are reused.
#
#   bash benchmarks/lambda_sweep.sh OUT [ITERATIONS=60]
set -euo pipefail
out=${1:?usage: lambda_sweep.sh OUT [ITERATIONS]}
iterations=${2:-60}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for lam in 0 0.1 1 10; do
  run="$out/lam$lam"
  if [ ! -f "$run/synthetic.safetensors" ]; then
    $py -m covmatch.distill --preset demo --lam "$lam" --iterations "$iterations" --out "$run" --overwrite \
      --no-progress --save-every "$iterations" >"$run.log" 2>&1
  fi
  if [ ! -f "$run/analysis/analysis.json" ]; then
    $py -m covmatch.analyze "$run" --real-pairs 2048 >>"$run.log" 2>&1
  fi
done
$py - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| lam | set | cov error | image mean gap | text mean gap |", "|---|---|---|---|---|"]
for run in sorted((p for p in out.glob("lam*") if p.is_dir()), key=lambda p: float(p.name[3:])):
    if not (run / "analysis" / "analysis.json").is_file():
        continue
    match = json.loads((run / "analysis" / "analysis.json").read_text())["match"]
    for name, m in next(iter(match.values())).items():
        rows.append(f"| {run.name[3:]} | {name} | {m['cov_error']:.4f} | {m['image_mean_gap']:.5f} | {m['text_mean_gap']:.5f} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
