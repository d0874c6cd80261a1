"""Warm start by supervised fine-tuning on the planner walkthroughs — on the SAME stack as DAPO.

    python -m agentevolver.sft --config-name alfworld_dapo_tiny [overrides]   # writes <default_local_dir>/hf_actor

Its own driver, two phases: `collect` plays each training game's stored walkthrough through the real
env pool with teacher forcing (`LLMPolicy(teacher=...)`), so the SFT rows are token-for-token the
sequences the RL rollout builds (same prompts, same observation turns, response_mask on the action
tokens); `train` runs the FSDP2 actor's `update_actor(loss="sft")` (token-mean NLL with the
mini-batch's global token count) once per epoch. It starts from actor_rollout_ref.model.path and
never from a checkpoint in the output folder unless one is named (`trainer.resume_mode=<global_step_N>`):
`resume_mode=auto` continues main_ppo runs, never SFT. The config is validated as given; the actor
settings SFT trains with are derived from it afterwards (`sft_config`), the given config is not edited.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from agentevolver.alfworld.play import WalkthroughPolicy
from agentevolver.main_ppo import CONFIG_DIR, output_dir_locked, validated
from agentevolver.protocol import Batch
from agentevolver.workers.rollout.base import SamplingParams

# sft.teacher -> the expert's maximum number of detours before it plays the planner walkthrough
TEACHERS: dict[str, Callable[[DictConfig], int]] = {
    "walkthrough": lambda cfg: 0,                # the plan verbatim (privileged: walks straight to the object)
    "explore": lambda cfg: cfg.sft.max_detours,  # 0..sft.max_detours seeded detours first (searches the room)
}


def make_teacher(cfg: DictConfig, name: str | None = None) -> Callable:
    """view -> response text: the planner walkthrough, after TEACHERS[name or sft.teacher] detours at most."""
    expert = WalkthroughPolicy(seed=cfg.trainer.seed, max_detours=TEACHERS[name or cfg.sft.teacher](cfg))
    return lambda view: f"<action>{expert.action(view)}</action>"


def sft_config(cfg: DictConfig) -> DictConfig:
    """A copy of the validated `cfg` with the actor settings of the SFT run: sft.lr for the actor lr,
    sft.ppo_mini_batch_size (if set) for its mini-batch, no overlong shaping (teacher rows carry no reward)."""
    out = copy.deepcopy(cfg)
    out.actor_rollout_ref.actor.optim.lr = cfg.sft.lr
    if cfg.sft.ppo_mini_batch_size is not None:
        out.actor_rollout_ref.actor.ppo_mini_batch_size = cfg.sft.ppo_mini_batch_size
    out.algorithm.dapo.overlong_reward_shaping.enable = False
    return out


class SFTDriver:
    """collect() teacher trajectories, then train() on them; writes hf_actor. No checkpoints of its own.

    Uses the trainer's runtime (Ray, env pool, workers, rollout, tracker) built with resume=False."""

    def __init__(self, cfg: DictConfig) -> None:
        from agentevolver.module.trainer.ae_ray_trainer import RayTrainer
        from agentevolver.module.trainer.checkpoint_manager import RESUME_MODES

        self.cfg = sft_config(cfg)
        self.runtime = RayTrainer(self.cfg, resume=False)
        mode, rt = str(cfg.trainer.resume_mode), self.runtime
        if mode not in RESUME_MODES:  # asked for: start from that checkpoint's actor
            path, _ = rt.ckpt.find_resume(mode)  # config_check: a complete checkpoint
            rt.workers.load_checkpoint(str(Path(path) / "actor"))
            rt.workers.sync_weights()
            print(f"sft: starting from the actor of {path} (trainer.resume_mode)", flush=True)
        elif rt.ckpt.list_steps():
            print(f"sft: starting from {cfg.actor_rollout_ref.model.path}, not from the checkpoints in {rt.out_dir} "
                  f"(resume_mode={mode} applies to main_ppo; name a global_step_N folder to start from it)",
                  flush=True)

    def collect(self) -> Batch:
        """Every training game, sft.samples_per_game teacher-forced episodes each."""
        cfg, rt = self.cfg, self.runtime
        t0 = time.perf_counter()
        games, size = rt.train_games, cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
        teacher = make_teacher(cfg)
        parts = [rt.rollout(games[i:i + size], cfg.sft.samples_per_game, SamplingParams(), f"sft{i}", {},
                            teacher=teacher) for i in range(0, len(games), size)]
        data = Batch.concat(parts)
        won = float(data.ids["won"].mean())
        print(f"sft: {len(data)} {cfg.sft.teacher}-teacher trajectories (won {won:.2f}), "
              f"{int(data['response_mask'].sum())} target tokens, collected in {time.perf_counter() - t0:.1f}s")
        return data

    def train(self, data: Batch) -> dict:
        """sft.epochs passes over `data` (seeded order), then the actor is exported as an HF folder."""
        cfg, rt = self.cfg, self.runtime
        metrics: dict = {}
        for epoch in range(cfg.sft.epochs):
            order = rt.rng_permutation(len(data), epoch)
            # an epoch is SFT's training step: lr_scheduler_type=cosine decays over the epochs
            metrics = rt.workers.update_actor(data.select(order), loss="sft", progress=epoch / cfg.sft.epochs)
            rt.tracker.log({"sft/epoch": epoch} | metrics, step=epoch)
        rt.workers.sync_weights()
        rt.workers.export_hf(str(rt.out_dir / "hf_actor"))
        print(f"sft: wrote {rt.out_dir / 'hf_actor'}")
        return metrics

    def shutdown(self) -> None:
        self.runtime.shutdown()


def run_sft(cfg: DictConfig) -> dict:
    validated(cfg)
    with output_dir_locked(cfg):  # one run per output folder, as main_ppo
        driver = SFTDriver(cfg)
        try:
            return driver.train(driver.collect())
        finally:
            driver.shutdown()


@hydra.main(config_path=CONFIG_DIR, config_name="alfworld_dapo_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    run_sft(cfg)


if __name__ == "__main__":
    main()
