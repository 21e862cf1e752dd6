#!/usr/bin/env bash
# Prepare .gpu_carry/ (git-ignored): what a bare GPU machine with no network lacks for run_gpu.sh.
#   wheels/        DeepSpeed (a pure-Python wheel built from PyPI's sdist) and the requirements the H200
#                  image lacks (hjson, pydantic and its parts), for the machine's Python (default 3.12)
#   text-encoder/  all-MiniLM-L6-v2's tokenizer and config without its 90 MB of weights: the step benchmark
#                  builds a randomly initialised BERT-base-shaped encoder on that tokenizer
# Run it here (with network to the package index), then send .gpu_carry along with the working tree;
# run_gpu.sh installs and uses whatever it finds there. About 6 MB.
#   bash benchmarks/prepare_gpu_carry.sh [CARRY_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY="${1:-.gpu_carry}"
TARGET_PYTHON="${TARGET_PYTHON:-3.12}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

DEEPSPEED="deepspeed==0.19.8"
# pydantic pins its pydantic-core exactly; these are a consistent set
BINARY=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  "typing-extensions>=4.14")

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/text-encoder"
"$PY" -m pip wheel -q --no-deps -w "$CARRY/wheels" "$DEEPSPEED"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  "${platforms[@]}" -d "$CARRY/wheels" "${BINARY[@]}"

# the packaged text encoder's tokenizer and config (covmatch.models.text resolves the same package)
MODEL_DIR="$("$PY" -c 'from covmatch.models import resolve_text_encoder_path as r; print(r("all-MiniLM-L6-v2"))')"
for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  cp "$MODEL_DIR/$f" "$CARRY/text-encoder/"
done
ls -la "$CARRY/wheels" "$CARRY/text-encoder"
du -sh "$CARRY"
