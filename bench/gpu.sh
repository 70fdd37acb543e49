#!/usr/bin/env bash
# One command for a CUDA machine: the cuda tests, then every benchmark at sizes that finish in
# under about 9 minutes together. Results: bench/results/<bench>-<gpu>.json, <gpu> from
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" -> h100, "Tesla T4" -> t4), and
# gpu-<gpu>.json: each step's time, its limit and whether it passed.
#
#   bash bench/gpu.sh [--model DIR] [--results DIR] [--cpu]
#
# DIR: a local checkpoint folder of the default model's shape (SmolLM2-135M; bench_prune's
# targets assume it), e.g. the one compact caches under ~/.cache/compact/models, copied over
# (the default model's GGUF is not in the repository and needs the gguf package, so it travels
# separately). Without --model a random model of that shape is built here, with a tokenizer
# trained on the builtin text and SmolLM2's 49,152-row vocabulary: its speeds and memory are the
# real model's, its quality numbers mean nothing.
# --results DIR: where the JSON goes (default bench/results); each file is written as its step
# ends, so whatever finished is there even if the whole command is stopped.
# --cpu: a rehearsal on this machine's CPU before GPU time is spent: the same steps, the CPU half
# of tests/test_cuda.py, the benches at toy sizes, results in out/gpu-rehearsal unless --results
# says otherwise. It checks that every step runs in this environment, not speed.
# Needs torch with CUDA, transformers, accelerate and safetensors; pytest for the tests (skipped,
# saying so, without it); not gradio, plotly, datasets or gguf. With liger-kernel installed (a
# pure-Python wheel; triton comes with CUDA torch) the liger test and bench modes run too.
# The time limits below add up to 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # python3: some machines (GPU images among them) have no "python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COMPACT_HOME=${COMPACT_HOME:-$PWD/out/gpu-home}  # caches (tokenized builtin text) stay here

MODEL="" RESULTS="" CPU=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=${2:?--model needs a folder}; shift 2 ;;
    --results) RESULTS=${2:?--results needs a folder}; shift 2 ;;
    --cpu) CPU=1; shift ;;
    *) echo "usage: bash bench/gpu.sh [--model DIR] [--results DIR] [--cpu]" >&2; exit 2 ;;
  esac
done

if ! $PY -c "import torch" 2>/dev/null; then
  echo "bench/gpu.sh: '$PY' cannot import torch; name the one that has it: PYTHON=... bash bench/gpu.sh" >&2
  exit 2
fi
if [ -n "$CPU" ]; then
  GPU=cpu-rehearsal
  RESULTS=${RESULTS:-out/gpu-rehearsal}
  export CUDA_VISIBLE_DEVICES=""
  TESTS=(-m "not cuda")
  # toy sizes: each bench's code paths, not its numbers; the CPU is slow, so no step limits
  PRUNE=(--device cpu --blocks 2 --seq-len 64 --batch 2 --repeats 1)
  DISTILL=(--device cpu --steps 1 --batch 1 --seq-len 64 --fast)
  SPEED=(--device cpu --clicks 1 --budget-s 0.5)
  SPARSE=(--device cpu --repeats 1)
  LIMITS=(900 900 900 900 900)
else
  if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False); --cpu rehearses" >&2
    exit 2
  fi
  GPU=$($PY -c "import re, torch
name = torch.cuda.get_device_name().lower().replace('nvidia', '')
m = re.search(r'\b([a-z]{1,2}\d{1,3}[a-z]?)\b', name)
print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '-', name).strip('-'))")
  RESULTS=${RESULTS:-bench/results}
  TESTS=(-m cuda)  # the CPU half runs in CI
  PRUNE=() DISTILL=(--steps 10) SPEED=() SPARSE=(--repeats 10)
  LIMITS=(150 60 200 40 90)  # tests, prune, distill, speed, sparse: 540 s
fi
mkdir -p "$RESULTS"
STEPS=$(mktemp)
FAILED=()

write_steps() {  # gpu-<gpu>.json from the steps so far: name, limit, seconds, exit status
  $PY - "$STEPS" "$RESULTS/gpu-$GPU.json" "$GPU" <<'EOF'
import json, sys, time
from bench.common import device_name, write_json
import torch
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
steps = [{"name": n, "limit_s": int(lim), "seconds": int(sec), "exit": int(rc)} for n, lim, sec, rc in rows]
total = sum(s["seconds"] for s in steps)
write_json(sys.argv[2], {
    "device": device_name(torch.device("cpu" if sys.argv[3] == "cpu-rehearsal" else "cuda")),
    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "steps": steps,
    "summary": {"total_s": total, "within_9_min": total <= 540,
                "failed": ", ".join(s["name"] for s in steps if s["exit"]) or "none",
                **{f"{s['name']} s": s["seconds"] for s in steps}},
})
EOF
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit; a failure is noted, not fatal
  local name=$1 limit=$2 start=$SECONDS rc=0; shift 2
  echo "== $name (limit ${limit}s, $(date +%T))" >&2
  timeout "$limit" "$@" || rc=$?
  [ $rc -eq 0 ] || { echo "== $name FAILED (exit $rc)" >&2; FAILED+=("$name"); }
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$((SECONDS - start))" "$rc" >>"$STEPS"
  write_steps
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
  step "cuda tests" "${LIMITS[0]}" $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" tests/test_cuda.py
else
  echo "== cuda tests SKIPPED: pytest is not installed" >&2
  FAILED+=("cuda tests (no pytest)")
fi
step bench_prune "${LIMITS[1]}" $PY -m bench.bench_prune --model "$MODEL" "${PRUNE[@]}" \
  --out "$RESULTS/prune-$GPU.json"
step bench_distill "${LIMITS[2]}" $PY -m bench.bench_distill --model "$MODEL" "${DISTILL[@]}" \
  --out "$RESULTS/distill-$GPU.json"
step bench_speed "${LIMITS[3]}" $PY -m bench.bench_speed --model "$MODEL" "${SPEED[@]}" \
  --out "$RESULTS/speed-$GPU.json"
step bench_sparse "${LIMITS[4]}" $PY -m bench.bench_sparse --model "$MODEL" "${SPARSE[@]}" \
  --out "$RESULTS/sparse-$GPU.json"
rm -f "$STEPS"

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "bench/gpu.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
echo "bench/gpu.sh: done; results in $RESULTS/*-$GPU.json" >&2
