"""The batch contract (agentevolver/protocol.py): the declared rollout row, concat, union by traj_id, select."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agentevolver.protocol import (
    EPISODE_IDS,
    ROLLOUT_IDS,
    ROLLOUT_TENSORS,
    ROW_IDS,
    Batch,
    rollout_batch,
    with_model_inputs,
)

_ID_VALUES = {"U": "x", "b": True, "i": 1, "f": 0.5}


def rollout_parts(n: int = 3, P: int = 4, R: int = 5, tag: str = "r"):
    """Tensors and ids of n schema rows (row i: i+1 prompt tokens, min(i+2, R) response tokens)."""
    tensors = {k: torch.zeros(n, P if spec.width == "P" else R, dtype=spec.dtype) for k, spec in ROLLOUT_TENSORS.items()}
    for i in range(n):
        tensors["prompts"][i, P - i - 1:] = torch.arange(1, i + 2)
        tensors["prompt_attention_mask"][i, P - i - 1:] = 1
        r = min(i + 2, R)
        tensors["responses"][i, :r] = torch.arange(10, 10 + r)
        tensors["response_attention_mask"][i, :r] = 1
        tensors["response_mask"][i, :r] = 1.0
    ids = {k: np.array([_ID_VALUES[kind]] * n) for k, kind in ROLLOUT_IDS.items()}
    ids["traj_id"] = np.array([f"{tag}{i}" for i in range(n)])
    ids["score"] = np.arange(n, dtype=np.float32)
    return tensors, ids


def test_schema_is_declared_once_and_rows_are_checked():
    assert set(ROLLOUT_IDS) == set(EPISODE_IDS) | set(ROW_IDS) and not set(EPISODE_IDS) & set(ROW_IDS)
    tensors, ids = rollout_parts()
    batch = rollout_batch(tensors, ids, temperature=0.7)
    assert len(batch) == 3 and batch.meta == {"temperature": 0.7}
    with pytest.raises(ValueError, match=r"missing \['anchor'\], extra \['returns'\]"):
        rollout_batch(tensors | {"returns": torch.zeros(3, 5)}, {k: v for k, v in ids.items() if k != "anchor"}, 1.0)
    with pytest.raises(ValueError, match="response_mask: want 2-d torch.float32"):
        rollout_batch(tensors | {"response_mask": tensors["response_mask"].long()}, ids, 1.0)
    with pytest.raises(ValueError, match="token_level_rewards is 4 wide"):
        rollout_batch(tensors | {"token_level_rewards": torch.zeros(3, 4)}, ids, 1.0)
    with pytest.raises(ValueError, match="rollout id won: want numpy kind 'b'"):
        rollout_batch(tensors, ids | {"won": np.array(["yes"] * 3)}, 1.0)
    with pytest.raises(ValueError, match="unique traj_id"):
        rollout_batch(tensors, ids | {"traj_id": np.array(["a", "a", "b"])}, 1.0)
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        Batch({"responses": torch.zeros(3, 2)}, {"traj_id": np.array(["a", "b"])})


def test_concat_pads_by_side_and_refuses_different_keys_or_meta():
    a = rollout_batch(*rollout_parts(2, P=3, R=4, tag="a"), temperature=1.0)
    b = rollout_batch(*rollout_parts(2, P=5, R=2, tag="b"), temperature=1.0)
    both = Batch.concat([a, Batch(), with_model_inputs(b)])  # a key-less Batch() is skipped
    assert both.ids["traj_id"].tolist() == ["a0", "a1", "b0", "b1"]
    assert both["prompts"].shape == (4, 5) and both["responses"].shape == (4, 4)
    assert both["prompts"][0].tolist() == [0, 0, 0, 0, 1]  # prompts pad on the left, responses on the right
    assert both["responses"][2].tolist() == [10, 11, 0, 0]
    assert "input_ids" not in both  # derived inputs are re-derived after a concat, never stacked stale
    with pytest.raises(ValueError, match=r"differ in keys: \['advantages'\]"):
        Batch.concat([a, Batch(b.tensors | {"advantages": torch.zeros(2, 2)}, b.ids, b.meta)])
    with pytest.raises(ValueError, match=r"differ in keys: \['anchor'\]"):
        Batch.concat([a, Batch(b.tensors, {k: v for k, v in b.ids.items() if k != "anchor"}, b.meta)])
    with pytest.raises(ValueError, match="meta 'temperature' conflicts: 1.0 vs 0.5"):
        Batch.concat([a, rollout_batch(*rollout_parts(2, tag="c"), temperature=0.5)])


def test_union_matches_rows_by_traj_id_whatever_the_order():
    batch = rollout_batch(*rollout_parts(4), temperature=1.0)
    order = np.array([2, 0, 3, 1])
    shuffled_ids = batch.ids["traj_id"][order]
    logp = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 5) + 0.5  # row of r<k> holds k + 0.5
    result = Batch({"old_log_probs": logp[order]}, {"traj_id": shuffled_ids})
    joined = batch.union(result)
    assert joined["old_log_probs"][:, 0].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert joined.ids["traj_id"].tolist() == batch.ids["traj_id"].tolist()
    with pytest.raises(ValueError, match=r"both batches define \['response_mask'\]"):
        batch.union(Batch({"response_mask": torch.zeros(4, 5)}, {"traj_id": shuffled_ids}))
    with pytest.raises(ValueError, match="traj_id 'r3' not found"):  # a row of ours has no result
        batch.union(Batch({"x": torch.zeros(4, 1)}, {"traj_id": np.array(["r0", "r1", "r2", "nope"])}))


def test_union_refuses_conflicting_meta():
    batch = rollout_batch(*rollout_parts(2), temperature=1.0)
    extra = Batch({"x": torch.ones(2, 1)}, {"traj_id": batch.ids["traj_id"]}, {"temperature": 1.0, "tag": "ok"})
    assert batch.union(extra).meta == {"temperature": 1.0, "tag": "ok"}  # equal values merge
    with pytest.raises(ValueError, match="Batch.union: meta 'temperature' conflicts: 1.0 vs 0.0"):
        batch.union(Batch({"x": torch.ones(2, 1)}, {"traj_id": batch.ids["traj_id"]}, {"temperature": 0.0}))


def test_select_by_index_or_mask_and_require():
    batch = rollout_batch(*rollout_parts(4), temperature=1.0)
    picked = batch.select(np.array([3, 1]))
    assert picked.ids["traj_id"].tolist() == ["r3", "r1"] and picked["score"].tolist() == [3.0, 1.0]
    assert torch.equal(picked["responses"], batch["responses"][[3, 1]]) and picked.meta == batch.meta
    masked = batch.select(batch.ids["score"] >= 2)
    assert masked.ids["traj_id"].tolist() == ["r2", "r3"]
    assert len(batch.select(np.zeros(4, dtype=bool))) == 0
    assert batch.select(np.arange(4)[::-1]).ids["traj_id"].tolist() == ["r3", "r2", "r1", "r0"]  # negative stride
    batch.require("responses", "uid")
    with pytest.raises(KeyError, match=r"missing \['advantages'\]"):
        batch.require("responses", "advantages")


def test_trainer_advantage_stage_requires_its_inputs_and_dispatches_by_registry():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from agentevolver.module.exp_manager import advantages as algos
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    tensors, ids = rollout_parts(4)
    ids["uid"] = np.array(["g", "g", "h", "h"])
    ids["episode_id"] = ids["traj_id"]
    tensors["token_level_rewards"][:, 1] = torch.tensor([1.0, 0.0, 1.0, 0.5])
    batch = rollout_batch(tensors, ids, temperature=1.0)
    algo = OmegaConf.create({"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": False, "use_kl_in_reward": True,
                             "kl_penalty": "kl", "kl_ctrl": {"kl_coef": 0.5}, "gamma": 1.0,
                             "gigpo": {"step_advantage_w": 1.0, "mode": "mean_norm"}})
    trainer = SimpleNamespace(cfg=OmegaConf.create({"algorithm": algo, "env": {"rollout_mode": "trajectory"}}))
    with pytest.raises(KeyError, match=r"missing \['old_log_probs', 'ref_log_prob'\]"):
        RayTrainer._compute_advantage(trainer, batch, {})  # KL in the reward reads both log-probs
    logp = torch.full((4, 5), -1.0)
    with_logp = Batch(batch.tensors | {"old_log_probs": logp, "ref_log_prob": logp - 0.2}, batch.ids, batch.meta)
    metrics: dict = {}
    out = RayTrainer._compute_advantage(trainer, with_logp, metrics)
    # reward - 0.5 · 0.2 per model token, then GRPO without std over the groups g, h
    shaped = with_logp["token_level_rewards"] - 0.1 * with_logp["response_mask"]
    expected, _ = algos.compute_grpo_outcome_advantage(shaped, with_logp["response_mask"], ids["uid"],
                                                       norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(out["advantages"], expected)
    assert metrics == {} and "returns" not in out
    trainer.cfg.algorithm.adv_estimator = "gigpo"
    trainer.cfg.algorithm.use_kl_in_reward = False
    trainer.cfg.env.rollout_mode = "step"
    no_anchor = Batch(batch.tensors, {k: v for k, v in batch.ids.items() if k != "anchor"}, batch.meta)
    with pytest.raises(KeyError, match=r"missing \['anchor'\]"):
        RayTrainer._compute_advantage(trainer, no_anchor, {})
    RayTrainer._compute_advantage(trainer, batch, metrics)
    assert set(metrics) == {"gigpo/shared_state_frac"}  # the estimator's own metric reaches the trainer
