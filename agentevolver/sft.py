"""Warm start by supervised fine-tuning on the planner walkthroughs — on the SAME stack as DAPO.

    python -m agentevolver.sft --config-name alfworld_dapo_tiny [overrides]   # writes <default_local_dir>/hf_actor

Each training game's stored walkthrough is played through the real env pool with teacher forcing
(`LLMPolicy(teacher=...)`), so the SFT rows are token-for-token the sequences the RL rollout builds
(same prompts, same observation turns, response_mask on the action tokens). The FSDP2 actor then
runs `update_actor(loss="sft")`: token-mean NLL with the mini-batch's global token count.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from agentevolver.alfworld.play import WalkthroughPolicy
from agentevolver.main_ppo import CONFIG_DIR, validated
from agentevolver.protocol import Batch
from agentevolver.workers.rollout.base import SamplingParams

# sft.teacher -> the expert's maximum number of detours before it plays the planner walkthrough
TEACHERS: dict[str, Callable[[DictConfig], int]] = {
    "walkthrough": lambda cfg: 0,                # the plan verbatim (privileged: walks straight to the object)
    "explore": lambda cfg: cfg.sft.max_detours,  # 0..sft.max_detours seeded detours first (searches the room)
}


def make_teacher(cfg: DictConfig) -> Callable:
    """view -> response text: the planner walkthrough, after TEACHERS[sft.teacher] detours at most."""
    expert = WalkthroughPolicy(seed=cfg.trainer.seed, max_detours=TEACHERS[cfg.sft.teacher](cfg))
    return lambda view: f"<action>{expert.action(view)}</action>"


def run_sft(cfg: DictConfig) -> dict:
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    cfg.actor_rollout_ref.actor.optim.lr = cfg.sft.lr
    if cfg.sft.ppo_mini_batch_size is not None:
        cfg.actor_rollout_ref.actor.ppo_mini_batch_size = cfg.sft.ppo_mini_batch_size
    cfg.algorithm.dapo.overlong_reward_shaping.enable = False
    validated(cfg)
    trainer = RayTrainer(cfg)
    try:
        t0 = time.perf_counter()
        games, size = trainer.train_games, cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
        teacher = make_teacher(cfg)
        parts = [trainer.rollout(games[i:i + size], cfg.sft.samples_per_game, SamplingParams(), f"sft{i}", {},
                                  teacher=teacher) for i in range(0, len(games), size)]
        data = Batch.concat(parts)
        won = float(data.ids["won"].mean())
        print(f"sft: {len(data)} {cfg.sft.teacher}-teacher trajectories (won {won:.2f}), "
              f"{int(data['response_mask'].sum())} target tokens, collected in {time.perf_counter() - t0:.1f}s")
        metrics = {}
        for epoch in range(cfg.sft.epochs):
            order = trainer.rng_permutation(len(data), epoch)
            # an epoch is SFT's training step: lr_scheduler_type=cosine decays over the epochs
            metrics = trainer.workers.update_actor(data.select(order), loss="sft", progress=epoch / cfg.sft.epochs)
            trainer.tracker.log({"sft/epoch": epoch} | metrics, step=epoch)
        trainer.workers.sync_weights()
        trainer.workers.export_hf(str(trainer.out_dir / "hf_actor"))
        print(f"sft: wrote {trainer.out_dir / 'hf_actor'}")
        return metrics
    finally:
        trainer.shutdown()


@hydra.main(config_path=CONFIG_DIR, config_name="alfworld_dapo_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    run_sft(cfg)


if __name__ == "__main__":
    main()
