#!/usr/bin/env bash
# The README's ablation table (issue 16): every preset of agentevolver.demo from one warm start per seed.
#   bash scripts/demo_ablation.sh [SEEDS...]      (default: 1 2)   -> outputs/ablation/seed<S>/<preset>/summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-20}   # every row 20 DAPO steps (make demo runs teacher_curriculum for 30)
# fixed first (it builds the shared warm start), then the full stack, then the rows between
PRESETS=${PRESETS:-"fixed teacher_curriculum teacher replay fresh curriculum guided teacher_k2 teacher_sil dagger"}
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(1 2)
for seed in "${seeds[@]}"; do
  base=outputs/ablation/seed$seed
  first=""
  for preset in $PRESETS; do
    if [ -f "$base/$preset/summary.json" ]; then echo "have $base/$preset/summary.json"; first=${first:-$base/$preset}; continue; fi
    if [ -z "$first" ]; then
      $PY -m agentevolver.demo --seed "$seed" --preset "$preset" --steps "$STEPS" --out "$base/$preset"
      first=$base/$preset
    else
      $PY -m agentevolver.demo --seed "$seed" --preset "$preset" --steps "$STEPS" --out "$base/$preset" --warm-start "$first"
    fi
  done
done
$PY - <<'PY'
import json, pathlib
for f in sorted(pathlib.Path("outputs/ablation").glob("seed*/*/summary.json")):
    s = json.loads(f.read_text())
    print(f"{f.parent.parent.name:6s} {s['preset']:10s} warm={s['warm_start_success_rate']:.3f} "
          f"dapo={s['dapo_success_rate']:.3f} gain={s['gain']:+.3f} ci95={s['gain_ci95']} {s['wall_time_s']:.0f}s")
PY
