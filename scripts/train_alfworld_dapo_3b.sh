#!/usr/bin/env bash
# DAPO on ALFWorld with Qwen2.5-3B-Instruct (config/alfworld_dapo_3b.yaml) on a GPU node.
#   bash scripts/train_alfworld_dapo_3b.sh [hydra overrides...]
# Env: MODEL_PATH (local HF folder), ALFWORLD_DATA (from `alfworld-download`), WANDB_API_KEY (optional),
#      RAY_ADDRESS (join an existing multi-node cluster; set trainer.nnodes accordingly).
# The GPU count, model path and data are checked before anything starts (one-line errors, exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the vLLM image ships python3 only
export TOKENIZERS_PARALLELISM=false
export VLLM_USE_V1=${VLLM_USE_V1:-1}

if command -v nvidia-smi >/dev/null; then
  echo "GPUs on this node: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
else
  echo "warning: nvidia-smi not found; the config check will refuse vLLM without CUDA" >&2
fi
echo "=== resolved config ==="
"$PY" -m agentevolver.main_ppo --config-name alfworld_dapo_3b "$@" --cfg job --resolve
echo "=== training ==="
exec "$PY" -m agentevolver.main_ppo --config-name alfworld_dapo_3b "$@"
