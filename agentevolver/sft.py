"""Warm start by supervised fine-tuning on the planner walkthroughs — on the SAME stack as DAPO.

    python -m agentevolver.sft --config-name alfworld_dapo_tiny [overrides]   # writes <default_local_dir>/hf_actor

Each training game's stored walkthrough is played through the real env pool with teacher forcing
(`LLMPolicy(teacher=...)`), so the SFT rows are token-for-token the sequences the RL rollout builds
(same prompts, same observation turns, response_mask on the action tokens). The FSDP2 actor then
runs `update_actor(loss="sft")`: token-mean NLL with the mini-batch's global token count.
"""
from __future__ import annotations

import random
import time

import hydra
from omegaconf import DictConfig

from agentevolver.main_ppo import CONFIG_DIR, validated
from agentevolver.protocol import Batch
from agentevolver.workers.rollout.base import SamplingParams


def walkthrough_teacher(view) -> str:
    """The planner's walkthrough, verbatim (privileged: it walks straight to the hidden object)."""
    walkthrough = view.info.get("walkthrough") or []
    action = walkthrough[view.step] if view.step < len(walkthrough) else "look"
    return f"<action>{action}</action>"


class ExploringTeacher:
    """The walkthrough after 0..max_detours visits to other receptacles, chosen per episode (seeded).

    The planner knows where objects are; an agent does not. Detours show the search a real agent
    needs (go somewhere, see the object is not there, go on) using only legal moves, and the
    walkthrough still wins afterwards because `go to` is admissible from anywhere.
    """

    def __init__(self, seed: int, max_detours: int = 2) -> None:
        self.seed, self.max_detours = seed, max_detours
        self.plans: dict[str, list[str]] = {}

    def __call__(self, view) -> str:
        plan = self.plans.get(view.episode_id)
        if plan is None:
            walkthrough = list(view.info.get("walkthrough") or [])
            rng = random.Random(f"{self.seed}-{view.episode_id}")
            others = sorted(a for a in view.admissible if a.startswith("go to ") and a not in walkthrough)
            k = rng.randint(0, min(self.max_detours, len(others)))
            plan = self.plans[view.episode_id] = rng.sample(others, k) + walkthrough
        action = plan[view.step] if view.step < len(plan) else "look"
        return f"<action>{action}</action>"


TEACHERS = {"walkthrough": lambda seed, detours: walkthrough_teacher,
            "explore": lambda seed, detours: ExploringTeacher(seed, detours)}


def run_sft(cfg: DictConfig) -> dict:
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    cfg.actor_rollout_ref.actor.optim.lr = cfg.sft.lr
    cfg.algorithm.dapo.overlong_reward_shaping.enable = False
    validated(cfg)
    trainer = RayTrainer(cfg)
    try:
        t0 = time.perf_counter()
        games, size = trainer.train_games, cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
        teacher = TEACHERS[cfg.sft.teacher](cfg.trainer.seed, cfg.sft.max_detours)
        parts = [trainer.rollout(games[i:i + size], cfg.sft.samples_per_game, SamplingParams(), f"sft{i}", {},
                                  teacher=teacher) for i in range(0, len(games), size)]
        data = Batch.concat(parts)
        won = float(data.ids["won"].mean())
        print(f"sft: {len(data)} {cfg.sft.teacher}-teacher trajectories (won {won:.2f}), "
              f"{int(data['response_mask'].sum())} target tokens, collected in {time.perf_counter() - t0:.1f}s")
        metrics = {}
        for epoch in range(cfg.sft.epochs):
            order = trainer.rng_permutation(len(data), epoch)
            metrics = trainer.workers.update_actor(data.select(order), loss="sft")
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
