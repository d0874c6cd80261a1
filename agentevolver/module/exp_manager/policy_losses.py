"""The policy-loss registry (verl's `actor_rollout_ref.actor.policy_loss.loss_mode`): vanilla (DAPO's
`dapo_compute_policy_loss` in het_core_algos), gspo, clip_cov, kl_cov, cispo. Pure tensor functions of one
signature; `get_policy_loss_fn` is the only dispatch. Every knob comes in `PolicyLossParams`, built from the
config in one place (`PolicyLossParams.from_actor_config`): no function here has a default for a configured value.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agentevolver.module.exp_manager.het_core_algos import (
    Denominator,
    _apply_is_weights,
    _safe_div,
    agg_loss,
    dapo_compute_policy_loss,
    masked_mean,
    masked_sum,
)


# ----------------------------------------------------------------------------- policy-loss registry
@dataclass(frozen=True)
class PolicyLossParams:
    """The knobs of every loss mode (actor_rollout_ref.actor.* and .policy_loss.*, verl's names). No defaults:
    the values are base.yaml's, read in `from_actor_config`."""
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    off_cliprange_high: float | None  # None: off-policy (exp_mask) tokens clip like the others
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    kl_cov_ratio: float
    ppo_kl_coef: float

    @classmethod
    def from_actor_config(cls, actor: Any) -> PolicyLossParams:
        """From actor_rollout_ref.actor (its clip ratios) and its policy_loss block."""
        pl = actor.policy_loss
        return cls(clip_ratio_low=actor.clip_ratio_low, clip_ratio_high=actor.clip_ratio_high,
                   clip_ratio_c=actor.clip_ratio_c, off_cliprange_high=actor.off_cliprange_high,
                   clip_cov_ratio=pl.clip_cov_ratio, clip_cov_lb=pl.clip_cov_lb, clip_cov_ub=pl.clip_cov_ub,
                   kl_cov_ratio=pl.kl_cov_ratio, ppo_kl_coef=pl.ppo_kl_coef)


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor | None,
                   clipped_lower: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Detached masked means over this piece: pg_clipfrac, pg_clipfrac_lower, ppo_kl = mean(old - logp)."""
    with torch.no_grad():
        n = mask.sum()

        def frac(flag: torch.Tensor | None) -> torch.Tensor:
            return mask.new_zeros(()) if flag is None else _safe_div(masked_sum(flag.to(mask.dtype), mask), n)

        return {"pg_clipfrac": frac(clipped), "pg_clipfrac_lower": frac(clipped_lower),
                "ppo_kl": _safe_div(-masked_sum(log_ratio.detach(), mask), n)}


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, params: PolicyLossParams, *,
                                exp_mask: torch.Tensor | None = None,
                                rollout_is_weights: torch.Tensor | None = None, loss_agg_mode: str,
                                global_tokens: Denominator = None, global_seqs: Denominator = None,
                                loss_scale_factor: float | None = None) -> dict[str, torch.Tensor]:
    """`vanilla`: `dapo_compute_policy_loss` (clip-higher + dual-clip + exp_mask) with `params`."""
    return dapo_compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, exp_mask=exp_mask, cliprange_low=params.clip_ratio_low,
        cliprange_high=params.clip_ratio_high, clip_ratio_c=params.clip_ratio_c, loss_agg_mode=loss_agg_mode,
        off_cliprange_high=params.off_cliprange_high, global_tokens=global_tokens, global_seqs=global_seqs,
        loss_scale_factor=loss_scale_factor, rollout_is_weights=rollout_is_weights)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, params: PolicyLossParams, *,
                             exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                             loss_agg_mode: str, global_tokens: Denominator = None,
                             global_seqs: Denominator = None, loss_scale_factor: float | None = None
                             ) -> dict[str, torch.Tensor]:
    """GSPO (https://arxiv.org/abs/2507.18071), as verl's `gspo`. All inputs (B, T).

    Sequence ratio s_i = exp(Σ_t m_it·(logp_it - old_it) / |y_i|), |y_i| = max(Σ_t m_it, 1);
    token form s_it = exp(min(sg[log s_i] + logp_it - sg[logp_it], 10)) (value s_i, ∂s_it/∂logp_it = s_i);
    pg_it = max(-A_it·s_it, -A_it·clip(s_it, 1-eps_low, 1+eps_high))·w_it (no dual clip);
    pg_loss = agg_loss(pg, mask, "seq-mean-token-mean", global_seqs): the paper's sequence mean, whatever
    loss_agg_mode says (as verl). s_i reads only row i, so any split of ROWS over micro-batches and
    ranks gives the whole-batch value and gradient (a row is never cut). pg_clipfrac: tokens clipped.
    """
    mask = response_mask.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    seq_log_ratio = masked_sum(log_ratio, mask, axis=-1) / mask.sum(-1).clamp_min(1.0)  # (B,)
    log_s = torch.clamp(log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    l1 = -advantages * s
    l2 = -advantages * s.clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    pg = _apply_is_weights(torch.maximum(l1, l2), rollout_is_weights)
    pg_loss = agg_loss(pg, mask, "seq-mean-token-mean", global_tokens, global_seqs, loss_scale_factor)
    return {"pg_loss": pg_loss, "pg_losses": pg, **_ratio_metrics(log_ratio, mask, l2.detach() > l1.detach())}


def compute_policy_loss_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, params: PolicyLossParams, *,
                              exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                              loss_agg_mode: str, global_tokens: Denominator = None,
                              global_seqs: Denominator = None, loss_scale_factor: float | None = None
                              ) -> dict[str, torch.Tensor]:
    """CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585), as verl's `cispo`. All inputs (B, T).

    r = exp(clamp(logp - old, -20, 20)); pg_it = -sg[clip(r, 1-eps_low, 1+eps_high)]·A_it·logp_it·w_it:
    the IS weight is clipped and detached, so every token keeps a gradient -sg[clip(r)]·A (none is
    dropped, unlike PPO clipping). pg_loss = agg_loss(pg, mask, loss_agg_mode, ...); token-local, so split
    invariant like vanilla. pg_clipfrac: tokens whose r was clipped.
    """
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped = ratio.detach().clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    pg = _apply_is_weights(-clipped * advantages * log_prob, rollout_is_weights)
    pg_loss = agg_loss(pg, mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return {"pg_loss": pg_loss, "pg_losses": pg, **_ratio_metrics(log_ratio, mask, clipped != ratio.detach())}


def _centered_cov(advantages: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A_it - mean A)·(logp_it - mean logp), the means over this piece's valid tokens (detached)."""
    a, lp = advantages.detach(), log_prob.detach()
    return (a - masked_mean(a, mask)) * (lp - masked_mean(lp, mask))


def clip_cov_select(advantages: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor,
                    ppo_clipped: torch.Tensor, clip_cov_ratio: float, clip_cov_lb: float, clip_cov_ub: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip-Cov's token choice (arXiv 2505.22617 §4; verl `clip_cov`), (B, T) -> bool (B, T).

    Candidates: valid, not PPO-clipped tokens with lb < cov_it < ub (`_centered_cov`); k = max(1,
    int(clip_cov_ratio · N_valid)) of them are drawn uniformly (torch.randperm over the candidates in
    row-major order). All statistics are over the piece given: see `compute_policy_loss_clip_cov`.
    """
    valid = response_mask > 0
    cov = _centered_cov(advantages, log_prob, response_mask.to(log_prob.dtype))
    cand = valid & ~ppo_clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    chosen = torch.zeros_like(valid)
    idx = torch.nonzero(cand)
    if len(idx):
        k = max(int(clip_cov_ratio * valid.sum().item()), 1)
        idx = idx[torch.randperm(len(idx), generator=generator)[:k].to(idx.device)]
        chosen[idx[:, 0], idx[:, 1]] = True
    return chosen


def kl_cov_select(advantages: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor,
                  kl_cov_ratio: float) -> torch.Tensor:
    """KL-Cov's token choice (arXiv 2505.22617 §4; verl `kl_cov`): the top k = max(1, int(kl_cov_ratio ·
    N_valid)) valid tokens by `_centered_cov`, over the piece given. (B, T) -> bool (B, T)."""
    valid = response_mask > 0
    chosen = torch.zeros_like(valid)
    n = int(valid.sum().item())
    if n:
        cov = _centered_cov(advantages, log_prob, response_mask.to(log_prob.dtype))[valid]
        top = torch.topk(cov, max(1, int(n * kl_cov_ratio))).indices
        flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0][top]
        chosen.view(-1)[flat] = True
    return chosen


def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, params: PolicyLossParams, *,
                                 exp_mask: torch.Tensor | None = None,
                                 rollout_is_weights: torch.Tensor | None = None, loss_agg_mode: str,
                                 global_tokens: Denominator = None, global_seqs: Denominator = None,
                                 loss_scale_factor: float | None = None, cov_mask: torch.Tensor | None = None,
                                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Clip-Cov (arXiv 2505.22617), as verl's `clip_cov`. All inputs (B, T).

    r = exp(clamp(logp - old, -20, 20)); l1 = -A·r; l2 = -A·clip(r, 1-eps_low, 1+eps_high);
    pg = max(l1, l2)·(1 - C)·w, C = cov_mask or `clip_cov_select` on this piece: the chosen high-covariance
    tokens lose their loss and gradient (entropy-collapse control; no dual clip, as verl).
    pg_loss = agg_loss(pg, mask, loss_agg_mode, global counts). pg_clipfrac: PPO-clipped or chosen.
    Split invariance: for a FIXED C the loss is token-local, so any row split with global counts gives
    the whole-batch value and gradient. C itself is computed per piece (like verl, per micro-batch):
    its centring means and its k depend on the piece, so C — and the update — depend on the
    micro-batch size; with cov_mask passed from a whole-batch selection, they do not.
    """
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    l1 = -advantages * ratio
    l2 = -advantages * ratio.clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    ppo_clipped = l2.detach() > l1.detach()
    if cov_mask is None:
        cov_mask = clip_cov_select(advantages, log_prob, response_mask, ppo_clipped, params.clip_cov_ratio,
                                   params.clip_cov_lb, params.clip_cov_ub, generator)
    pg = _apply_is_weights(torch.maximum(l1, l2) * (~cov_mask.bool()).to(l1.dtype), rollout_is_weights)
    pg_loss = agg_loss(pg, mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return {"pg_loss": pg_loss, "pg_losses": pg, **_ratio_metrics(log_ratio, mask, ppo_clipped | cov_mask.bool())}


def compute_policy_loss_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                               response_mask: torch.Tensor, params: PolicyLossParams, *,
                               exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                               loss_agg_mode: str, global_tokens: Denominator = None,
                               global_seqs: Denominator = None, loss_scale_factor: float | None = None,
                               cov_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """KL-Cov (arXiv 2505.22617), as verl's `kl_cov`. All inputs (B, T).

    d = clamp(logp - old, -20, 20); pg = (-A·exp(d) + ppo_kl_coef·|d|·K)·w, K = cov_mask or
    `kl_cov_select` on this piece (no ratio clipping at all, as verl). pg_loss = agg_loss(pg, mask,
    loss_agg_mode, global counts). pg_clipfrac: the fraction of tokens K penalises. ppo_kl keeps the
    vanilla meaning mean(old - logp) (verl logs mean |d| here). Split invariance as Clip-Cov: exact for
    a fixed K; K from `kl_cov_select` depends on the piece it sees.
    """
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    if cov_mask is None:
        cov_mask = kl_cov_select(advantages, log_prob, response_mask, params.kl_cov_ratio)
    pg = -advantages * torch.exp(log_ratio) + params.ppo_kl_coef * log_ratio.abs() * cov_mask.to(log_ratio.dtype)
    pg = _apply_is_weights(pg, rollout_is_weights)
    pg_loss = agg_loss(pg, mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)
    return {"pg_loss": pg_loss, "pg_losses": pg, **_ratio_metrics(log_ratio, mask, cov_mask.bool())}


PolicyLossFn = Callable[..., dict[str, torch.Tensor]]
_POLICY_LOSS_FNS: dict[str, PolicyLossFn] = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "cispo": compute_policy_loss_cispo,
}
POLICY_LOSS_MODES: tuple[str, ...] = tuple(_POLICY_LOSS_FNS)


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The policy loss registered under `name` (actor_rollout_ref.actor.policy_loss.loss_mode). Every one is
    fn(old_log_prob, log_prob, advantages, response_mask, params, *, exp_mask, rollout_is_weights,
    loss_agg_mode, global_tokens, global_seqs, loss_scale_factor) -> {pg_loss, pg_losses, pg_clipfrac,
    pg_clipfrac_lower, ppo_kl}; only vanilla reads exp_mask (config_check forbids off_cliprange_high else)."""
    fn = _POLICY_LOSS_FNS.get(name)
    if fn is None:
        raise ValueError(f"unknown policy loss_mode {name!r}; valid: {', '.join(POLICY_LOSS_MODES)}")
    return fn
