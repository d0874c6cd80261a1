"""Numerical checks of the DAPO / GRPO maths against hand values and plain Python reference loops."""
import math
import random

import numpy as np
import pytest
import torch

from agentevolver.module.exp_manager.advantages import (
    ADV_ESTIMATORS,
    compute_advantage,
    compute_episode_advantage,
    compute_gigpo_advantage,
    compute_grpo_outcome_advantage,
    compute_rloo_outcome_advantage,
    get_adv_estimator,
)
from agentevolver.module.exp_manager.het_core_algos import (
    AGG_LOSS_MODES,
    DYNAMIC_SAMPLING_MODES,
    REWARD_SHAPING_MODES,
    agg_loss,
    apply_reward_shaping,
    count_tokens_and_seqs,
    dapo_compute_policy_loss,
    entropy_from_logits,
    filter_groups,
    kl_penalty,
    masked_mean,
    masked_whiten,
    overlong_penalty,
)
from tests.helpers import dapo_clip_kwargs, lengths_mask, random_partition

TOL = {"rtol": 0, "atol": 1e-6}

DAPO = dapo_clip_kwargs() | {"loss_agg_mode": "token-mean"}  # base.yaml's loss knobs


SEED_LOSSES = torch.tensor([[.1, .2, .3, 0, 0], [.4, .5, 0, 0, 0], [.6, .7, .8, .9, 1.0]], dtype=torch.float64)
SEED_MASK = lengths_mask([3, 2, 5], 5)


# ----------------------------------------------------------------------------- masked stats / agg_loss
def test_seed_example_values():
    expect = {
        "token-mean": 5.5 / 10,  # the seed says 0.45: wrong, the valid losses sum to 5.5
        "seq-mean-token-sum": (0.6 + 0.9 + 4.0) / 3,
        "seq-mean-token-mean": (0.2 + 0.45 + 0.8) / 3,
        "seq-mean-token-sum-norm": (0.6 + 0.9 + 4.0) / 3 / 5,
    }
    assert set(expect) == set(AGG_LOSS_MODES)
    for mode, value in expect.items():
        assert agg_loss(SEED_LOSSES, SEED_MASK, mode).item() == pytest.approx(value, abs=1e-6), mode
    assert agg_loss(SEED_LOSSES, SEED_MASK, "token-mean").item() == pytest.approx(0.55, abs=1e-6)
    assert agg_loss(SEED_LOSSES, SEED_MASK, "seq-mean-token-sum-norm", loss_scale_factor=10).item() == \
        pytest.approx(5.5 / 3 / 10, abs=1e-6)


def test_masked_mean_and_empty_masks():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    torch.testing.assert_close(masked_mean(values, mask, axis=-1), torch.tensor([1.5, 0.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    loss = torch.rand(3, 4, requires_grad=True)
    for mode in AGG_LOSS_MODES:
        out = agg_loss(loss, torch.zeros(3, 4), mode)
        out.backward()
        assert out.item() == 0.0 and not torch.isnan(loss.grad).any(), mode
        loss.grad = None
    white = masked_whiten(torch.randn(4, 6) * 3 + 2, torch.ones(4, 6))
    assert white.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert white.var().item() == pytest.approx(1.0, abs=1e-4)


def reference_agg(loss, mask, mode, scale=None):
    """Plain Python loops over rows and tokens."""
    rows = [(lr, mr) for lr, mr in zip(loss.tolist(), mask.tolist())]
    valid_rows = [(lr, mr) for lr, mr in rows if sum(mr) > 0]
    tokens = sum(sum(mr) for _, mr in rows)
    scale = len(rows[0][0]) if scale is None else scale
    row_sums = [sum(x * m for x, m in zip(lr, mr)) for lr, mr in valid_rows]
    if not valid_rows:
        return 0.0
    if mode == "token-mean":
        return sum(row_sums) / tokens
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / len(valid_rows)
    if mode == "seq-mean-token-mean":
        return sum(s / sum(mr) for s, (_, mr) in zip(row_sums, valid_rows)) / len(valid_rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(row_sums) / scale / len(valid_rows)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", AGG_LOSS_MODES)
def test_agg_loss_matches_reference_loop(mode):
    gen = torch.Generator().manual_seed(1)
    for trial in range(5):
        B, T = 6, 9
        lengths = torch.randint(0, T + 1, (B,), generator=gen).tolist()
        lengths[trial % B] = 0  # always at least one empty row: it must not count as a sequence
        loss = torch.randn(B, T, generator=gen, dtype=torch.float64)
        mask = lengths_mask(lengths, T)
        assert agg_loss(loss, mask, mode).item() == pytest.approx(reference_agg(loss, mask, mode), abs=1e-9)
        assert agg_loss(loss, mask.bool(), mode, loss_scale_factor=4.0).item() == \
            pytest.approx(reference_agg(loss, mask, mode, scale=4.0), abs=1e-9)


def test_agg_loss_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError) as err:
        agg_loss(SEED_LOSSES, SEED_MASK, "token-sum")
    for mode in AGG_LOSS_MODES:
        assert mode in str(err.value)
    with pytest.raises(ValueError, match="shape"):
        agg_loss(SEED_LOSSES, SEED_MASK[:, :3], "token-mean")


@pytest.mark.parametrize("mode", AGG_LOSS_MODES)
def test_split_invariance_values_and_grads(mode):
    gen, rng = torch.Generator().manual_seed(2), random.Random(3)
    B, T = 8, 7
    lengths = torch.randint(0, T + 1, (B,), generator=gen).tolist()
    lengths[2] = 0
    mask = lengths_mask(lengths, T)
    base = torch.randn(B, T, generator=gen, dtype=torch.float64)
    whole_in = base.clone().requires_grad_(True)
    whole = agg_loss(whole_in, mask, mode)
    whole.backward()
    partitions = [[[i] for i in range(B)], [list(range(B))], [[0, 1, 2], [3, 4, 5, 6, 7]]]
    partitions += [random_partition(B, rng) for _ in range(6)]
    for pieces in partitions:
        counts = [count_tokens_and_seqs(mask[idx]) for idx in pieces]  # like the actor: sum over pieces
        tokens, seqs = sum(c[0] for c in counts), sum(c[1] for c in counts)
        leaf = base.clone().requires_grad_(True)
        total = sum(agg_loss(leaf[idx], mask[idx], mode, global_tokens=tokens, global_seqs=seqs)
                    for idx in pieces)
        total.backward()
        assert total.item() == pytest.approx(whole.item(), abs=1e-9), pieces
        torch.testing.assert_close(leaf.grad, whole_in.grad, rtol=0, atol=1e-9)


def test_count_tokens_and_seqs():
    tokens, seqs = count_tokens_and_seqs(lengths_mask([3, 0, 5, 1], 6))
    assert (tokens.item(), seqs.item()) == (9, 3)


# ----------------------------------------------------------------------------- policy loss
def loss_inputs(ratios, advs):
    """old = 0, logp = log(ratio): one row of tokens with the given ratios and advantages."""
    logp = torch.log(torch.tensor([ratios], dtype=torch.float64)).requires_grad_(True)
    return torch.zeros_like(logp), logp, torch.tensor([advs], dtype=torch.float64)


def test_clip_higher_and_dual_clip_boundaries():
    d = 1e-4
    cases = [  # (ratio, advantage, expected per-token loss, clipped (l2 > l1), dual clip active)
        (1.28 - d, 1.0, -(1.28 - d), False, False),  # just inside 1 + eps_high
        (1.28 + d, 1.0, -1.28, True, False),         # just outside: clipped, no gradient
        (0.5, 1.0, -0.5, False, False),              # low side never clips for A > 0
        (5.0, 1.0, -1.28, True, False),              # dual clip never applies for A > 0
        (0.8 + d, -1.0, 0.8 + d, False, False),      # just inside 1 - eps_low
        (0.8 - d, -1.0, 0.8, True, False),           # just outside: clipped to 1 - eps_low
        (3.0 - d, -1.0, 3.0 - d, False, False),      # just below c: unclipped (ratio > 1 + eps_high)
        (3.0 + d, -1.0, 3.0, False, True),           # beyond c: dual clip -A·c
        (10.0, -2.0, 6.0, False, True),
        (1.5, 0.0, 0.0, False, False),
    ]
    old, logp, adv = loss_inputs([c[0] for c in cases], [c[1] for c in cases])
    mask = torch.ones_like(adv)
    out = dapo_compute_policy_loss(old, logp, adv, mask, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
                                   loss_agg_mode="token-mean")
    torch.testing.assert_close(out["pg_losses"][0], torch.tensor([c[2] for c in cases], dtype=torch.float64), **TOL)
    out["pg_loss"].backward()
    n = len(cases)
    # d/dlogp (-A·ratio) = -A·ratio where the unclipped branch is active, 0 where any clip bites
    expect_grad = [0.0 if (c[3] or c[4]) else -c[1] * c[0] / n for c in cases]
    torch.testing.assert_close(logp.grad[0], torch.tensor(expect_grad, dtype=torch.float64), **TOL)
    assert out["pg_clipfrac"].item() == pytest.approx(3 / n, abs=1e-6)
    assert out["pg_clipfrac_lower"].item() == pytest.approx(2 / n, abs=1e-6)
    assert out["pg_loss"].item() == pytest.approx(sum(c[2] for c in cases) / n, abs=1e-6)
    assert not out["pg_clipfrac"].requires_grad and not out["ppo_kl"].requires_grad


def test_metrics_use_response_mask_and_ppo_kl():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    logp = torch.tensor([[-0.5, -2.5, -0.5, 5.0]], dtype=torch.float64)  # ratios e^.5, e^-.5, 1, (masked)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = dapo_compute_policy_loss(old, logp, adv, mask, **DAPO)
    assert out["ppo_kl"].item() == pytest.approx((-0.5 + 0.5 + 0.0) / 3, abs=1e-6)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)  # e^.5 > 1.28 (A>0), e^-.5 < .8 (A<0)
    assert out["pg_clipfrac_lower"].item() == 0.0
    assert out["pg_loss"].item() == pytest.approx((-1.28 + 0.8 - 1.0) / 3, abs=1e-6)
    empty = dapo_compute_policy_loss(old, logp, adv, torch.zeros_like(mask), **DAPO)
    assert all(empty[k].item() == 0.0 for k in ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        dapo_compute_policy_loss(old, logp, adv, mask, **(DAPO | {"clip_ratio_c": 1.0}))


def random_policy_batch(seed, B=5, T=12):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old + 0.6 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).contiguous()
    mask = lengths_mask(torch.randint(1, T + 1, (B,), generator=gen).tolist(), T)
    exp_mask = (torch.rand(B, T, generator=gen) < 0.5).to(torch.float64)
    return old, logp, adv, mask, exp_mask


def run_loss(old, logp, adv, mask, **kw):
    leaf = logp.clone().requires_grad_(True)
    out = dapo_compute_policy_loss(old, leaf, adv, mask, **(DAPO | kw))
    out["pg_loss"].backward()
    return out, leaf.grad


def assert_same(a, b):
    (out_a, grad_a), (out_b, grad_b) = a, b
    for key in ("pg_loss", "pg_losses", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        torch.testing.assert_close(out_a[key], out_b[key], **TOL)
    torch.testing.assert_close(grad_a, grad_b, **TOL)


@pytest.mark.parametrize("mode", AGG_LOSS_MODES)
def test_exp_mask_equivalences(mode):
    old, logp, adv, mask, exp_mask = random_policy_batch(4)
    kw = {"cliprange_low": 0.2, "cliprange_high": 0.28, "loss_agg_mode": mode}
    on = run_loss(old, logp, adv, mask, **kw)
    off = run_loss(old, logp, adv, mask, **{**kw, "cliprange_high": 0.6})
    assert on[0]["pg_clipfrac"].item() > off[0]["pg_clipfrac"].item()  # the two settings do differ
    assert_same(run_loss(old, logp, adv, mask, exp_mask=torch.zeros_like(mask), off_cliprange_high=0.6, **kw), on)
    assert_same(run_loss(old, logp, adv, mask, exp_mask=None, off_cliprange_high=0.6, **kw), on)
    assert_same(run_loss(old, logp, adv, mask, exp_mask=torch.ones_like(mask), off_cliprange_high=0.6, **kw), off)
    assert_same(run_loss(old, logp, adv, mask, exp_mask=torch.ones_like(mask), **kw), on)  # None -> same bound
    mixed, mixed_grad = run_loss(old, logp, adv, mask, exp_mask=exp_mask, off_cliprange_high=0.6, **kw)
    merged = torch.where(exp_mask.bool(), off[0]["pg_losses"], on[0]["pg_losses"])
    torch.testing.assert_close(mixed["pg_losses"], merged, **TOL)
    assert mixed["pg_loss"].item() == pytest.approx(agg_loss(merged, mask, mode).item(), abs=1e-6)
    torch.testing.assert_close(mixed_grad, torch.where(exp_mask.bool(), off[1], on[1]), **TOL)
    ratio = torch.exp(logp - old)
    high = torch.where(exp_mask.bool(), 1.6, 1.28)
    clipped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < 0.8))
    assert mixed["pg_clipfrac"].item() == pytest.approx(masked_mean(clipped.double(), mask).item(), abs=1e-6)


# ----------------------------------------------------------------------------- KL and entropy
def test_kl_penalties_match_hand_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.3, -40.0])
    ref = torch.tensor([-1.5, -0.5, -0.3, -5.0])
    d = [0.5, -1.5, 0.0, -35.0]
    k3 = [min(10.0, math.exp(-min(x, 20.0) if x > -20 else 20.0) + max(x, -20.0) - 1) for x in d]
    expect = {"kl": d, "k1": d, "abs": [abs(x) for x in d], "mse": [0.5 * x * x for x in d],
              "k2": [0.5 * x * x for x in d], "low_var_kl": k3, "k3": k3}
    assert k3[0] == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-9) and k3[3] == 10.0
    for name, values in expect.items():
        torch.testing.assert_close(kl_penalty(logp, ref, name), torch.tensor(values), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(logp, ref, "full")


def test_entropy_matches_categorical():
    logits = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for scale in (1.0, 50.0, 1000.0):
        expect = torch.distributions.Categorical(logits=logits * scale).entropy()
        got = entropy_from_logits(logits * scale)
        assert got.shape == (4, 5) and not torch.isnan(got).any()
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- advantages
def outcome_rewards(scores, T=4, lengths=None, dtype=torch.float32):
    """Rewards on the last valid token of each row, as the reward manager places them."""
    lengths = lengths or [T] * len(scores)
    rewards = torch.zeros(len(scores), T, dtype=dtype)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        rewards[i, n - 1] = s
    return rewards, lengths_mask(lengths, T).float()


def test_grpo_known_example():
    index = np.array(["a", "b", "a", "c", "a", "b"])
    rewards, mask = outcome_rewards([1.0, 3.0, 0.0, 5.0, 4.0, 3.0], lengths=[4, 2, 3, 4, 1, 4])
    adv, returns = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=True, epsilon=1e-6)
    std_a = math.sqrt(((1 - 5 / 3) ** 2 + (0 - 5 / 3) ** 2 + (4 - 5 / 3) ** 2) / 2)  # unbiased
    per_row = [(1 - 5 / 3) / (std_a + 1e-6), 0.0, (0 - 5 / 3) / (std_a + 1e-6), 0.0, (4 - 5 / 3) / (std_a + 1e-6), 0.0]
    torch.testing.assert_close(adv, torch.tensor(per_row)[:, None] * mask, **TOL)
    torch.testing.assert_close(returns, adv)
    adv_raw, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    raw = [1 - 5 / 3, 0.0, 0 - 5 / 3, 0.0, 4 - 5 / 3, 0.0]  # b: equal rewards, c: singleton -> 0
    torch.testing.assert_close(adv_raw, torch.tensor(raw)[:, None] * mask, **TOL)
    rloo, _ = compute_rloo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=True)
    torch.testing.assert_close(rloo[:, 0] * (mask[:, 0] > 0), torch.tensor([1 - 2.0, 0, 0 - 2.5, 0, 4 - 0.5, 0]), **TOL)


def test_episode_advantage_counts_each_episode_once():
    # step mode: group g = episodes e1 (won, 1 turn) and e2 (lost, 3 turns); e3 alone in group h
    episode = ["e1", "e2", "e2", "e2", "e3"]
    is_last = [True, False, False, True, True]
    scores = [1.0, 0.0, 0.0, 0.0, 1.0]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    adv = compute_episode_advantage("grpo", scores, ["g", "g", "g", "g", "h"], episode, is_last, mask, True)
    a = (1 - 0.5) / (math.sqrt(0.5) + 1e-6)  # unbiased std of {1, 0}: per episode, not per row
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, -a, 0.0])[:, None] * mask, **TOL)
    # row-level GRPO would weigh e2 three times: mean 0.25 instead of 0.5
    row_adv, _ = compute_grpo_outcome_advantage(torch.tensor(scores)[:, None], torch.ones(5, 1), ["g"] * 4 + ["h"],
                                                 norm_adv_by_std_in_grpo=True)
    assert abs(row_adv[0, 0].item() - a) > 0.1


def test_gigpo_adds_step_group_advantage_by_anchor_state():
    # group g: e1 won in 2 turns (states s0, s1), e2 lost in 3 (s0, s2, s2); e3 won alone in group h from s0
    episode = ["e1", "e1", "e2", "e2", "e2", "e3"]
    turns = [0, 1, 0, 1, 2, 0]
    is_last = [False, True, False, False, True, True]
    anchors = ["s0", "s1", "s0", "s2", "s2", "s0"]
    scores = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    index = ["g"] * 5 + ["h"]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.float32)
    adv, metrics = compute_gigpo_advantage(scores, index, episode, turns, is_last, anchors, mask, gamma=0.5,
                                           step_advantage_w=1.0, mode="mean_norm")
    # episodes: ±(1 - 0.5); returns R = 0.5^(T-1-t)·s: e1 (0.5, 1), e2 (0, 0, 0), e3 (1)
    # step groups: (g, s0) = {0.5, 0} -> ±0.25; (g, s1), (h, s0) alone and (g, s2) all-equal -> 0
    expect = torch.tensor([0.5 + 0.25, 0.5, -0.5 - 0.25, -0.5, -0.5, 0.0])[:, None] * mask
    torch.testing.assert_close(adv, expect, **TOL)
    assert metrics == {"gigpo/shared_state_frac": pytest.approx(4 / 6)}  # rows of (g, s0) and (g, s2)
    std, _ = compute_gigpo_advantage(scores, index, episode, turns, is_last, anchors, mask, gamma=0.5,
                                  step_advantage_w=2.0, mode="mean_std_norm")
    a, s = 0.5 / (math.sqrt(0.5) + 1e-6), 0.25 / (math.sqrt(0.125) + 1e-6)  # unbiased stds of {1,0}, {.5,0}
    torch.testing.assert_close(std[:, 0], torch.tensor([a + 2 * s, a, -a - 2 * s, -a, -a, 0.0]), **TOL)
    no_step, _ = compute_gigpo_advantage(scores, index, episode, turns, is_last, anchors, mask, gamma=0.5,
                                         step_advantage_w=0.0, mode="mean_norm")
    torch.testing.assert_close(no_step, compute_episode_advantage("grpo", scores, index, episode, is_last, mask,
                                                                  norm_adv_by_std_in_grpo=False), **TOL)
    with pytest.raises(ValueError, match="valid: mean_norm, mean_std_norm"):
        compute_gigpo_advantage(scores, index, episode, turns, is_last, anchors, mask, gamma=1.0,
                                step_advantage_w=1.0, mode="std")


def test_grpo_degenerate_groups_are_exactly_zero():
    # float64 0.1 * 3 / 3 != 0.1: a naive (s - mean) / (std + eps) would give ~1e-11, not 0
    rewards, mask = outcome_rewards([0.0] * 4 + [0.1] * 3, dtype=torch.float64)
    index = [7, 7, 7, 7, "x", "x", "x"]
    for fn in (compute_grpo_outcome_advantage, compute_rloo_outcome_advantage):
        adv, _ = fn(rewards, mask, index, norm_adv_by_std_in_grpo=True)
        assert torch.equal(adv, torch.zeros_like(adv)), fn
    adv, _ = compute_grpo_outcome_advantage(*outcome_rewards([2.0]), ["solo"], norm_adv_by_std_in_grpo=True)
    assert torch.equal(adv, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="valid: grpo, rloo, gigpo"):
        get_adv_estimator("gae-ish")
    with pytest.raises(ValueError, match="index"):
        compute_grpo_outcome_advantage(rewards, mask, [1, 2], norm_adv_by_std_in_grpo=True)


# ----------------------------------------------------------------------------- estimator registry
def _algo_config(norm=True, gamma=0.9, w=0.5, mode="mean_norm"):
    from omegaconf import OmegaConf

    return OmegaConf.create({"norm_adv_by_std_in_grpo": norm, "gamma": gamma,
                             "gigpo": {"step_advantage_w": w, "mode": mode}})


def _trajectory_rows():
    """Two groups of three episodes (one row each); the last row never reached the model (empty mask)."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
                        dtype=torch.float32)
    score = np.array([1.0, 0.0, 0.5, 1.0, -0.1, 0.0], dtype=np.float32)
    rewards = torch.zeros(6, 4)
    for i in range(5):
        rewards[i, int(mask[i].nonzero()[-1, 0])] = float(score[i])
    ids = [f"t{i}" for i in range(6)]
    return {"token_level_rewards": rewards, "response_mask": mask, "uid": np.array(["g"] * 3 + ["h"] * 3),
            "score": score, "episode_id": np.array(ids), "is_last": np.ones(6, dtype=bool)}


def _step_rows():
    """Step mode: g = e1 (won, 2 turns), e2 (lost, 3 turns); h = e3 (won), e4 (0.5), one turn each."""
    return {"response_mask": torch.ones(7, 2), "token_level_rewards": torch.zeros(7, 2),  # unread in step mode
            "uid": np.array(["g"] * 5 + ["h", "h"]),
            "score": np.array([1, 1, 0, 0, 0, 1, 0.5], dtype=np.float32),
            "episode_id": np.array(["e1", "e1", "e2", "e2", "e2", "e3", "e4"]),
            "turn": np.array([0, 1, 0, 1, 2, 0, 0]),
            "is_last": np.array([False, True, False, False, True, True, True]),
            "anchor": np.array(["s0", "s1", "s0", "s2", "s2", "s0", "s0"])}


# Values the trainer's former per-estimator branches gave on the rows above (commit 1cacc9b).
BEFORE_REGISTRY = {
    ("grpo", "trajectory", True): [0.9999979734420776, -0.9999979734420776, 0.0, 1.150791049003601,
                                   -0.6575948596000671, 0.0],
    ("grpo", "trajectory", False): [0.5, -0.5, 0.0, 0.699999988079071, -0.4000000059604645, 0.0],
    ("rloo", "trajectory", True): [0.75, -0.75, 0.0, 1.0499999523162842, -0.6000000238418579, 0.0],
    ("grpo", "step", True): [0.7071057558059692] * 2 + [-0.7071057558059692] * 3 + [0.7071048021316528,
                                                                                    -0.7071048021316528],
    ("rloo", "step", True): [1.0, 1.0, -1.0, -1.0, -1.0, 0.5, -0.5],
    ("gigpo", "step", True): [0.7250000238418579, 0.5, -0.7250000238418579, -0.5, -0.5, 0.375, -0.375],
}


@pytest.mark.parametrize("name,mode,norm", list(BEFORE_REGISTRY))
def test_estimator_registry_keeps_the_values(name, mode, norm):
    rows = _step_rows() if mode == "step" else _trajectory_rows()
    assert set(ADV_ESTIMATORS[name].inputs) <= set(rows)  # each estimator says what it reads
    adv, metrics = compute_advantage(name, rows, _algo_config(norm=norm), step_mode=mode == "step")
    torch.testing.assert_close(adv, torch.tensor(BEFORE_REGISTRY[name, mode, norm])[:, None] * rows["response_mask"],
                               **TOL)
    # the gigpo metric comes from the estimator: rows whose (group, state) another row shares, 6 of 7
    assert metrics == ({"gigpo/shared_state_frac": pytest.approx(6 / 7)} if name == "gigpo" else {})


def test_estimator_registry_declares_needs_and_uses_the_config():
    assert list(ADV_ESTIMATORS) == ["grpo", "rloo", "gigpo"]
    assert [n for n, e in ADV_ESTIMATORS.items() if e.step_mode_only] == ["gigpo"]
    assert all(e.needs_groups for e in ADV_ESTIMATORS.values())
    assert [n for n, e in ADV_ESTIMATORS.items() if e.uses_discount] == ["gigpo"]
    with pytest.raises(ValueError, match="needs env.rollout_mode=step"):
        compute_advantage("gigpo", _step_rows(), _algo_config(), step_mode=False)
    # gamma and w are read from the config, not from defaults: gamma=1, w=0 leaves the episode advantage
    flat, _ = compute_advantage("gigpo", _step_rows(), _algo_config(gamma=1.0, w=0.0), step_mode=True)
    torch.testing.assert_close(flat[:, 0], torch.tensor([0.5, 0.5, -0.5, -0.5, -0.5, 0.25, -0.25]), **TOL)
    import inspect

    params = inspect.signature(compute_gigpo_advantage).parameters
    assert all(params[k].default is inspect.Parameter.empty for k in ("gamma", "step_advantage_w", "mode"))


# ----------------------------------------------------------------------------- dynamic sampling
def test_filter_groups_each_mode():
    index = np.array(["all_ok", "none_ok", "mixed", "neg", "all_ok", "none_ok", "mixed", "neg"])
    scores = torch.tensor([1.0, 0.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0])
    expect = {
        "none": ["all_ok", "none_ok", "mixed", "neg"],
        "strict": ["mixed", "neg"],                          # drops zero-variance groups
        "remove_all_correct": ["none_ok", "mixed", "neg"],
        "remove_all_incorrect": ["all_ok", "mixed"],        # 'neg' has no row with score > 0
    }
    assert set(expect) == set(DYNAMIC_SAMPLING_MODES)
    for mode, kept_groups in expect.items():
        keep, metrics = filter_groups(scores, index, mode)
        assert keep.dtype == bool and keep.tolist() == [g in kept_groups for g in index], mode
        assert metrics["dynamic_sampling/kept_groups"] == len(kept_groups)
        assert metrics["dynamic_sampling/kept_rows"] == 2 * len(kept_groups)
        assert (metrics["dynamic_sampling/solve_all"], metrics["dynamic_sampling/solve_none"]) == (1, 2)
    with pytest.raises(ValueError, match="strict"):
        filter_groups(scores, index, "loose")


# ----------------------------------------------------------------------------- reward shaping
def test_overlong_penalty():
    lengths = [50, 80, 90, 100, 120]
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, 1.0), torch.tensor([0, 0, -0.5, -1, -1.0]))
    torch.testing.assert_close(overlong_penalty(torch.tensor(lengths), 100, 20, 2.0),
                               torch.tensor([0, 0, -1.0, -2, -2]))
    torch.testing.assert_close(overlong_penalty(lengths, 100, 0, 1.0), torch.tensor([0, 0, 0, 0, -1.0]))
    for bad in ((100, 200, 1.0), (100, -1, 1.0), (100, 20, -1.0)):
        with pytest.raises(ValueError):
            overlong_penalty(lengths, *bad)


def test_reward_shaping_modes():
    scores, penalty = [1.0, 1.0, 0.0, -0.5, 2.0], [0.0, -0.5, -0.5, -1.0, -0.25]
    expect = {
        "additive": [1.0, 0.5, -0.5, -1.5, 1.75],
        "multiplicative": [1.0, 0.5, 0.0, 0.0, 1.5],
        "replace_if_positive": [1.0, -0.5, -0.5, -1.5, -0.25],
        "cap": [1.0, 0.0, 0.0, -0.5, 0.0],
    }
    assert set(expect) == set(REWARD_SHAPING_MODES)
    for mode, values in expect.items():
        torch.testing.assert_close(apply_reward_shaping(scores, penalty, mode), torch.tensor(values), **TOL)
    torch.testing.assert_close(apply_reward_shaping(torch.tensor(scores), torch.tensor(penalty), "cap", cap=0.3),
                               torch.tensor([1.0, 0.3, 0.0, -0.5, 0.3]))
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        apply_reward_shaping(scores, [-2.0] * 5, "multiplicative")
    with pytest.raises(ValueError, match="additive"):
        apply_reward_shaping(scores, penalty, "subtract")
