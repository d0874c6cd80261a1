"""The fast guard that the training signal is wired with the right sign and scale.

A one-step task on the real stack (Ray worker group, FSDP2 actor on gloo, HF rollout, GRPO, the
token-mean DAPO update, weight sync): the reward is 1 when the first generated token belongs to a
fixed target set covering ~10 % of the vocabulary. A random-init policy starts near chance; DAPO
must drive success to >= 0.9 within a bounded number of steps.
"""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from hydra import compose, initialize_config_dir

from agentevolver.main_ppo import CONFIG_DIR
from agentevolver.module.exp_manager.advantages import compute_grpo_outcome_advantage
from agentevolver.protocol import Batch
from agentevolver.workers.rollout.base import SamplingParams

GROUPS, N, MAX_STEPS = 4, 8, 30


def make_batch(prompt: list[int], outs: list, rewards: list[float], step: int) -> Batch:
    rows = len(outs)
    R = max(len(o.token_ids) for o in outs)
    responses = torch.zeros(rows, R, dtype=torch.long)
    mask = torch.zeros(rows, R)
    logp = torch.zeros(rows, R)
    for i, o in enumerate(outs):
        responses[i, :len(o.token_ids)] = torch.tensor(o.token_ids)
        mask[i, :len(o.token_ids)] = 1
        logp[i, :len(o.token_ids)] = torch.tensor(o.log_probs)
    token_rewards = torch.zeros(rows, R)
    token_rewards[torch.arange(rows), mask.sum(-1).long() - 1] = torch.tensor(rewards)
    prompts = torch.tensor([prompt] * rows)
    return Batch({"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts), "responses": responses,
                  "response_attention_mask": mask.long(), "response_mask": mask, "rollout_log_probs": logp,
                  "token_level_rewards": token_rewards},
                 {"traj_id": np.array([f"s{step}-{i}" for i in range(rows)]),
                  "uid": np.array([f"s{step}-g{i // N}" for i in range(rows)])}, {"temperature": 1.0})


@pytest.mark.slow
def test_dapo_drives_bandit_to_success(tiny_model_dir, tmp_path):
    from agentevolver.workers.worker_group import ActorRolloutRefGroup

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=[
            f"actor_rollout_ref.model.path={tiny_model_dir}", "trainer.n_gpus_per_node=1",
            "actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.rollout.n=8",
            "data.train_batch_size=4", f"trainer.default_local_dir={tmp_path}"])
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    group = ActorRolloutRefGroup(cfg)
    try:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
        target = set(np.random.default_rng(0).choice(vocab, size=vocab // 10, replace=False).tolist())
        prompt = [1, 2, 3, 4]
        history = []
        for step in range(MAX_STEPS):
            params = SamplingParams(temperature=1.0, max_tokens=1, n=1, seed=step)
            outs = [o[0] for o in group.generate([prompt] * (GROUPS * N), params)]
            rewards = [float(o.token_ids[0] in target) for o in outs]
            history.append(float(np.mean(rewards)))
            if step >= 2 and np.mean(history[-2:]) >= 0.9:
                break
            batch = make_batch(prompt, outs, rewards, step)
            batch = batch.union(group.compute_log_prob(batch))
            adv, _ = compute_grpo_outcome_advantage(batch["token_level_rewards"], batch["response_mask"],
                                                    batch.ids["uid"], norm_adv_by_std_in_grpo=True)
            batch = Batch(batch.tensors | {"advantages": adv}, batch.ids, batch.meta)
            metrics = group.update_actor(batch)
            assert np.isfinite(metrics["actor/pg_loss"])
            group.sync_weights()
    finally:
        group.shutdown()
        ray.shutdown()
    print("success by step:", [round(h, 3) for h in history])
    assert history[0] < 0.3, history  # near chance (~0.1) at random init
    assert np.mean(history[-2:]) >= 0.9, history
