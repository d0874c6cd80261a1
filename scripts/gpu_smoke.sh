#!/usr/bin/env bash
# One command: the 3B training step (generate -> old log-prob -> DAPO update -> weight sync, 2 rounds) of
# ONE rank on ONE GPU, without Ray, on a random-weight Qwen2.5-3B-shaped model. Prints one JSON line.
#   bash scripts/gpu_smoke.sh                        # on a GPU (<= 6 min on one H200, by design; see README)
#   GPU_SMOKE_SHAPE=tiny bash scripts/gpu_smoke.sh   # CPU, seconds (what tests/scripts/test_gpu_smoke.py runs)
# Needs torch + transformers (+ numpy, pyyaml, tokenizers, safetensors, which transformers brings); no network.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" scripts/gpu_smoke.py
