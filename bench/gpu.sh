#!/usr/bin/env bash
# One command for a CUDA machine: the cuda tests, then every benchmark at sizes that finish in
# under about 9 minutes together. Results: bench/results/<bench>-<gpu>.json, <gpu> from
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" -> h100, "Tesla T4" -> t4).
#
#   bash bench/gpu.sh [--model DIR]
#
# DIR: a local checkpoint folder of the default model's shape (SmolLM2-135M; bench_prune's
# targets assume it), e.g. the one compact caches under ~/.cache/compact/models, copied over
# (the default model's GGUF is not in the repository and needs the gguf package, so it travels
# separately). Without --model a random model of that shape is built here, with a tokenizer
# trained on the builtin text and SmolLM2's 49,152-row vocabulary: its speeds and memory are the
# real model's, its quality numbers mean nothing.
# Needs torch with CUDA, transformers, accelerate and safetensors; pytest for the tests (skipped,
# saying so, without it); not gradio, plotly, datasets or gguf. With liger-kernel installed (a
# pure-Python wheel; triton comes with CUDA torch) the liger test and bench modes run too.
# The time limits below add up to 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COMPACT_HOME=${COMPACT_HOME:-$PWD/out/gpu-home}  # caches (tokenized builtin text) stay here

MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=${2:?--model needs a folder}; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--model DIR]" >&2; exit 2 ;;
  esac
done

if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "bench/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False)" >&2
  exit 2
fi
GPU=$($PY -c "import re, torch
name = torch.cuda.get_device_name().lower().replace('nvidia', '')
m = re.search(r'\b([a-z]{1,2}\d{1,3}[a-z]?)\b', name)
print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '-', name).strip('-'))")
RESULTS=bench/results
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit; a failure is noted, not fatal
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(date +%T))" >&2
  timeout "$limit" "$@" || { echo "== $name FAILED (exit $?)" >&2; FAILED+=("$name"); }
}

if [ -z "$MODEL" ]; then
  MODEL=out/gpu-model
  if [ ! -f "$MODEL/model.safetensors" ]; then
    echo "== building a random model of SmolLM2-135M's shape in $MODEL" >&2
    $PY - "$MODEL" <<'EOF' || exit 1
import sys

from compact import models
from tests.helpers import tiny_model, tiny_tokenizer

tok = tiny_tokenizer()
model = tiny_model("llama", 49152, layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, head_dim=64)
models.save(model, tok, sys.argv[1], {"source": "bench/gpu.sh: random weights, SmolLM2-135M's shape"})
EOF
  fi
fi

if $PY -c "import pytest" 2>/dev/null; then
  step "cuda tests" 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
else
  echo "== cuda tests SKIPPED: pytest is not installed" >&2
  FAILED+=("cuda tests (no pytest)")
fi
step bench_prune 60 $PY -m bench.bench_prune --model "$MODEL" --out "$RESULTS/prune-$GPU.json"
step bench_distill 200 $PY -m bench.bench_distill --model "$MODEL" --steps 10 \
  --out "$RESULTS/distill-$GPU.json"
step bench_speed 40 $PY -m bench.bench_speed --model "$MODEL" --out "$RESULTS/speed-$GPU.json"
step bench_sparse 90 $PY -m bench.bench_sparse --model "$MODEL" --repeats 10 \
  --out "$RESULTS/sparse-$GPU.json"

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "bench/gpu.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
echo "bench/gpu.sh: done; results in $RESULTS/*-$GPU.json" >&2
