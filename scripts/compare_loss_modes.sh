#!/usr/bin/env bash
# Issue 17's measurement: the CPU demo's warm start (seed S), then a SHORT DAPO phase (STEPS steps, held-out
# evaluation before and after) per setting, same seeds. SFT takes the shared lock, then the DAPO runs take it once.
#   scripts/compare_loss_modes.sh OUT [SEED] [STEPS]
set -euo pipefail
OUT=$(realpath -m "${1:?usage: compare_loss_modes.sh OUT [SEED] [STEPS]}"); SEED=${2:-1}; STEPS=${3:-4}
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 WANDB_MODE=offline PYTHONPATH=$PWD
LOCK="flock /tmp/ae_heavy.lock"
MODEL=models/tiny-qwen2
DATA=$OUT/data
COMMON=(env.alfworld.data_dir="$DATA" trainer.seed="$SEED" data.seed="$SEED" trainer.resume_mode=disable)
[ -f $MODEL/config.json ] || $PY -m agentevolver.models.build_tiny --out $MODEL  # no Ray, no gloo: no lock
if [ ! -d "$DATA/json_2.1.1/train" ]; then  # the demo's games (agentevolver/demo.py defaults)
  KNOBS=(--min-receptacles 3 --max-receptacles 4 --distractors 0 --closed-fraction 0.0)
  $PY -m agentevolver.alfworld generate --out "$DATA" --num-games 128 --seed $((1000 * SEED)) --split train "${KNOBS[@]}"
  $PY -m agentevolver.alfworld generate --out "$DATA" --num-games 60 --seed $((1000 * SEED + 500)) --split valid_seen "${KNOBS[@]}"
fi
if [ ! -f "$OUT/sft/hf_actor/config.json" ]; then
  $LOCK $PY -m agentevolver.sft --config-name alfworld_dapo_tiny "${COMMON[@]}" actor_rollout_ref.model.path=$MODEL \
    trainer.default_local_dir="$OUT/sft" hydra.run.dir="$OUT/hydra/sft"
fi
run() {  # NAME OVERRIDES...
  local name=$1; shift
  [ -f "$OUT/$name/done" ] && return 0
  rm -f "$OUT/$name/metrics.jsonl"
  $PY -m agentevolver.main_ppo --config-name alfworld_dapo_tiny "${COMMON[@]}" \
    actor_rollout_ref.model.path="$OUT/sft/hf_actor" trainer.default_local_dir="$OUT/$name" \
    trainer.val_before_train=true trainer.logger=[console,file] hydra.run.dir="$OUT/hydra/$name" \
    trainer.total_training_steps=$STEPS trainer.test_freq=$STEPS trainer.save_freq=0 trainer.export_hf=false "$@" 9>&-
  # 9>&-: Ray's processes must not inherit the lock's descriptor (one that outlived the run would hold it)
  touch "$OUT/$name/done"
}
runs() {
  run vanilla
  run gspo actor_rollout_ref.actor.policy_loss.loss_mode=gspo
  run clip_cov actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov
  run vanilla_token_tis algorithm.rollout_correction.rollout_is=token
  run vanilla_bypass algorithm.rollout_correction.bypass_mode=true
}
exec 9>/tmp/ae_heavy.lock
flock 9  # one acquisition for the five short runs (each re-queueing behind the other helpers costs more)
runs
flock -u 9
$PY scripts/summarize_loss_modes.py "$OUT" vanilla gspo clip_cov vanilla_token_tis vanilla_bypass
