"""Advantage estimators (algorithm.adv_estimator) as pure functions, and their registry: grpo, rloo (outcome,
per row or per episode) and gigpo (step groups). Each estimator declares what it reads and needs; the trainer
and config_check read those declarations, and `compute_advantage` is the only dispatch.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agentevolver.module.exp_manager.het_core_algos import ArrayLike, _group_ids


# ----------------------------------------------------------------------------- group advantages
def _group_scores(token_level_rewards: torch.Tensor, index: Sequence[Hashable] | np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (score, group mean, unbiased group std, degenerate) in float64; degenerate rows are in a
    group of one or a group whose scores are all equal (their advantage is exactly 0)."""
    scores = token_level_rewards.detach().sum(-1).to(torch.float64)  # (B,)
    gid_np, groups = _group_ids(index)
    if len(gid_np) != scores.shape[0]:
        raise ValueError(f"index has {len(gid_np)} ids but token_level_rewards has {scores.shape[0]} rows")
    gid = torch.from_numpy(gid_np).to(scores.device)
    zeros = torch.zeros(groups, dtype=torch.float64, device=scores.device)
    count = zeros.index_add(0, gid, torch.ones_like(scores))
    mean = zeros.index_add(0, gid, scores) / count
    centered = scores - mean[gid]
    std = (zeros.index_add(0, gid, centered * centered) / (count - 1).clamp_min(1)).sqrt()
    high = zeros.scatter_reduce(0, gid, scores, "amax", include_self=False)
    low = zeros.scatter_reduce(0, gid, scores, "amin", include_self=False)
    degenerate = (count < 2) | (high == low)
    return scores, mean[gid], std[gid], degenerate[gid]


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: Sequence[Hashable] | np.ndarray, *, norm_adv_by_std_in_grpo: bool,
                                   epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (https://arxiv.org/abs/2402.03300): s_i = Σ_t r_it; A_i = (s_i - mean_g) / (std_g + eps)
    (std unbiased; without std when norm_adv_by_std_in_grpo is False) over rows sharing index[i];
    broadcast over valid tokens. Singleton / all-equal groups get exactly 0. (B, T) -> (adv, returns)."""
    scores, mean, std, degenerate = _group_scores(token_level_rewards, index)
    adv = scores - mean
    if norm_adv_by_std_in_grpo:
        adv = adv / (std + epsilon)
    adv = torch.where(degenerate, torch.zeros_like(adv), adv).to(token_level_rewards.dtype)
    adv = adv.unsqueeze(-1) * response_mask.to(adv.dtype)
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: Sequence[Hashable] | np.ndarray, *, norm_adv_by_std_in_grpo: bool,
                                   epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (https://arxiv.org/abs/2402.14740): A_i = s_i - mean_{j≠i} s_j = n/(n-1)·(s_i - mean_g);
    singleton groups get 0. The std/epsilon arguments are accepted for a uniform signature and unused."""
    scores, mean, _, degenerate = _group_scores(token_level_rewards, index)
    gid, _ = _group_ids(index)
    n = torch.from_numpy(np.bincount(gid)[gid]).to(scores)
    adv = (scores - mean) * n / (n - 1).clamp_min(1)
    adv = torch.where(degenerate, torch.zeros_like(adv), adv).to(token_level_rewards.dtype)
    adv = adv.unsqueeze(-1) * response_mask.to(adv.dtype)
    return adv, adv


def compute_episode_advantage(estimator: str, scores: ArrayLike, index: Sequence[Hashable] | np.ndarray,
                              episode_ids: Sequence[Hashable] | np.ndarray, is_last: ArrayLike,
                              response_mask: torch.Tensor, norm_adv_by_std_in_grpo: bool) -> torch.Tensor:
    """Step mode (one row per turn): the outcome advantage of each EPISODE, from its is_last row's score
    and the group `index` of those rows (each episode counts once in its group's baseline, however many
    turns it took), broadcast to every row of the episode: A_row = A_episode(row) · mask_row.
    `estimator` is an outcome estimator: grpo | rloo."""
    outcome = _OUTCOME_FNS.get(estimator)
    if outcome is None:
        raise ValueError(f"unknown outcome estimator {estimator!r}; valid: {', '.join(_OUTCOME_FNS)}")
    last = np.asarray(is_last, dtype=bool)
    ep_scores = torch.as_tensor(np.asarray(scores, dtype=np.float32)[last]).unsqueeze(-1)
    ep_adv, _ = outcome(ep_scores, torch.ones_like(ep_scores), np.asarray(index)[last],
                        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
    episodes = np.asarray(episode_ids)
    by_episode = dict(zip(episodes[last].tolist(), ep_adv[:, 0].tolist()))
    per_row = torch.tensor([by_episode[e] for e in episodes.tolist()], dtype=torch.float32)
    return per_row.unsqueeze(-1) * response_mask.to(torch.float32)


GIGPO_MODES: tuple[str, ...] = ("mean_norm", "mean_std_norm")


def gigpo_step_groups(index: Sequence[Hashable] | np.ndarray, anchors: Sequence[Hashable] | np.ndarray
                      ) -> list[tuple[Hashable, Hashable]]:
    """GiGPO's step group of each row: (episode group, observation anchor)."""
    return list(zip(np.asarray(index).tolist(), np.asarray(anchors).tolist()))


def compute_gigpo_advantage(scores: ArrayLike, index: Sequence[Hashable] | np.ndarray,
                            episode_ids: Sequence[Hashable] | np.ndarray, turns: ArrayLike, is_last: ArrayLike,
                            anchors: Sequence[Hashable] | np.ndarray, response_mask: torch.Tensor, *,
                            gamma: float, step_advantage_w: float, mode: str) -> tuple[torch.Tensor, dict[str, float]]:
    """GiGPO (verl-agent, https://arxiv.org/abs/2505.10978) on step-mode rows with a terminal reward:
    A_row = A_E(episode) + w · A_S(row).
    A_E: the episode's outcome advantage within its group `index` (compute_episode_advantage, GRPO).
    A_S: R_t = γ^(T-1-t) · s_episode, the discounted return of turn t of a T-turn episode, centred
    (mean_norm) or standardised (mean_std_norm) over its STEP group: the rows of the same `index` whose
    observation `anchor` is the same, whichever episode or turn they come from. It tells apart actions
    taken from one state (the one that won sooner vs. the one that looped). Step groups of one row, or
    whose returns agree, add 0. gamma, w and mode are the config's (algorithm.gamma, algorithm.gigpo.*):
    no defaults here, so a caller cannot silently disagree with base.yaml.
    Returns (advantages (B, T), {"gigpo/shared_state_frac": fraction of rows whose step group has > 1 row,
    i.e. the rows that can get a step advantage at all}).
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"unknown gigpo mode {mode!r}; valid: {', '.join(GIGPO_MODES)}")
    std = mode == "mean_std_norm"
    episode_adv = compute_episode_advantage("grpo", scores, index, episode_ids, is_last, response_mask, std)
    episodes, last = np.asarray(episode_ids), np.asarray(is_last, dtype=bool)
    turn = np.asarray(turns, dtype=np.int64)
    final_turn = dict(zip(episodes[last].tolist(), turn[last].tolist()))
    final_score = dict(zip(episodes[last].tolist(), np.asarray(scores, dtype=np.float64)[last].tolist()))
    returns = torch.tensor([gamma ** (final_turn[e] - t) * final_score[e] for e, t in zip(episodes.tolist(), turn)],
                           dtype=torch.float64).unsqueeze(-1)
    states = gigpo_step_groups(index, anchors)
    step_adv, _ = compute_grpo_outcome_advantage(returns, torch.ones_like(returns), states,
                                                 norm_adv_by_std_in_grpo=std)
    seen = Counter(states)
    metrics = {"gigpo/shared_state_frac": float(np.mean([seen[s] > 1 for s in states])) if states else 0.0}
    return episode_adv + step_advantage_w * step_adv.to(torch.float32) * response_mask.to(torch.float32), metrics


# ----------------------------------------------------------------------------- advantage estimator registry
_OUTCOME_FNS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
}
Rows = Any  # anything indexable by field name, e.g. a protocol.Batch (core algos stay free of it)
EstimatorFn = Callable[[Rows, Any, bool], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class AdvEstimator:
    """An advantage estimator and what it needs, declared once: the trainer reads `inputs`, config_check
    reads the rest. fn(rows, algorithm_config, step_mode) -> (advantages (B, T), metrics)."""

    fn: EstimatorFn
    inputs: tuple[str, ...]       # the rollout fields it reads (protocol.ROLLOUT_SCHEMA names)
    step_mode_only: bool          # needs env.rollout_mode=step (one row per turn)
    needs_groups: bool            # compares the rollouts of a group: needs rollout.n >= 2
    uses_discount: bool           # reads algorithm.gamma


ADV_ESTIMATORS: dict[str, AdvEstimator] = {}


def register_adv_estimator(name: str, *, inputs: tuple[str, ...], step_mode_only: bool, needs_groups: bool,
                           uses_discount: bool) -> Callable[[EstimatorFn], EstimatorFn]:
    def deco(fn: EstimatorFn) -> EstimatorFn:
        ADV_ESTIMATORS[name] = AdvEstimator(fn, inputs, step_mode_only, needs_groups, uses_discount)
        return fn
    return deco


_OUTCOME_INPUTS = ("token_level_rewards", "response_mask", "uid", "score", "episode_id", "is_last")


def _outcome_estimator(name: str) -> EstimatorFn:
    """Trajectory mode: the outcome estimator on each row's token-level rewards (so a KL-in-reward term
    counts). Step mode: per episode, from its last row's score (compute_episode_advantage)."""
    def fn(rows: Rows, config: Any, step_mode: bool) -> tuple[torch.Tensor, dict[str, float]]:
        norm = bool(config.norm_adv_by_std_in_grpo)
        if step_mode:
            return compute_episode_advantage(name, rows["score"], rows["uid"], rows["episode_id"], rows["is_last"],
                                             rows["response_mask"], norm), {}
        adv, _ = _OUTCOME_FNS[name](rows["token_level_rewards"], rows["response_mask"], rows["uid"],
                                    norm_adv_by_std_in_grpo=norm)
        return adv, {}
    return fn


for _name in _OUTCOME_FNS:
    register_adv_estimator(_name, inputs=_OUTCOME_INPUTS, step_mode_only=False, needs_groups=True,
                           uses_discount=False)(_outcome_estimator(_name))


@register_adv_estimator("gigpo", inputs=("response_mask", "uid", "score", "episode_id", "turn", "is_last", "anchor"),
                        step_mode_only=True, needs_groups=True, uses_discount=True)
def _gigpo_estimator(rows: Rows, config: Any, step_mode: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """compute_gigpo_advantage with algorithm.gamma and algorithm.gigpo.{step_advantage_w, mode}."""
    return compute_gigpo_advantage(rows["score"], rows["uid"], rows["episode_id"], rows["turn"], rows["is_last"],
                                   rows["anchor"], rows["response_mask"], gamma=float(config.gamma),
                                   step_advantage_w=float(config.gigpo.step_advantage_w), mode=config.gigpo.mode)


def get_adv_estimator(name: str) -> AdvEstimator:
    """The advantage estimator registered under `name` (algorithm.adv_estimator)."""
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown adv_estimator {name!r}; valid: {', '.join(ADV_ESTIMATORS)}")
    return ADV_ESTIMATORS[name]


def compute_advantage(name: str, rows: Rows, config: Any, step_mode: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The one dispatch on algorithm.adv_estimator: (advantages (B, T), the estimator's metrics)."""
    est = get_adv_estimator(name)
    if est.step_mode_only and not step_mode:
        raise ValueError(f"adv_estimator {name!r} needs env.rollout_mode=step")
    return est.fn(rows, config, step_mode)
