"""Rollout correction: importance weights and rejection for the rollout / trainer mismatch, as pure functions.

The rollout engine (vLLM in bf16, or HF generate) samples from π_rollout, which differs slightly from the
π_old the FSDP actor computes for the same weights. With log ratio δ_it = log π_old(y_it) - log π_rollout(y_it)
(old_log_probs - rollout_log_probs, both (B, T)), verl's `algorithm.rollout_correction` (volcengine/verl
docs/algo/rollout_corr.md and verl/trainer/ppo/rollout_corr_helper.py, Nov 2025 API) offers:

- IS weights (`rollout_is`): token ρ_it = exp(clamp(δ_it, ±20)); sequence ρ_i = exp(clamp(Σ_t m_it·δ_it, ±20))
  broadcast over the row; truncated at `rollout_is_threshold` (TIS: w = min(ρ, thr)), 0 off the mask.
  The policy loss multiplies its per-token loss by w (`het_core_algos._apply_is_weights`).
- Rejection (`rollout_rs`, MIS / IcePop-like): token ρ_it, sequence ρ_i, or geometric exp(mean_t δ_it);
  tokens (token) or whole rows (sequence, geometric) with ρ outside [lower, upper] leave the loss mask;
  upper = rollout_rs_threshold (null: rollout_is_threshold), lower = rollout_rs_threshold_lower (null: 1/upper).
- Veto (`rollout_token_veto_threshold`): a row with any valid token ρ_it < veto leaves the mask entirely.

Everything here is computed once over the whole training batch in the trainer, before it is split: weights
are per token or per row and the mask is per token, so micro-batch and rank splits cannot change them.
"""
from __future__ import annotations

import math

import torch

from agentevolver.module.exp_manager.het_core_algos import masked_mean, masked_sum

ROLLOUT_IS_LEVELS: tuple[str, ...] = ("token", "sequence")
ROLLOUT_RS_LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")
SAFETY_BOUND = 20.0  # exp(±20): ratios stay finite (verl's bound)


def _level_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log ρ at the level's unit, broadcast to (B, T): token δ_it; sequence Σ_t m·δ; geometric mean_t δ."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_sum(log_ratio, mask, axis=-1).unsqueeze(-1).expand_as(log_ratio)
    if level == "geometric":
        return masked_mean(log_ratio, mask, axis=-1).unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"unknown rollout correction level {level!r}; valid: {', '.join(ROLLOUT_RS_LEVELS)}")


def compute_rollout_is_weights(log_ratio: torch.Tensor, response_mask: torch.Tensor, rollout_is: str,
                               rollout_is_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TIS weights w = min(exp(clamp(log ρ, ±20)), thr)·m and the raw ρ, both (B, T).

    log ρ: token δ_it, or sequence Σ_t m_it·δ_it (one weight per row, on each of its valid tokens)."""
    if rollout_is not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"unknown rollout_is {rollout_is!r}; valid: {', '.join(ROLLOUT_IS_LEVELS)}")
    if not rollout_is_threshold > 0:
        raise ValueError(f"rollout_is_threshold must be > 0, got {rollout_is_threshold}")
    mask = response_mask.to(log_ratio.dtype)
    rho = torch.exp(_level_log_ratio(log_ratio, mask, rollout_is).clamp(-SAFETY_BOUND, SAFETY_BOUND))
    return rho.clamp(max=rollout_is_threshold) * mask, rho


def compute_rollout_rejection_mask(log_ratio: torch.Tensor, response_mask: torch.Tensor, rollout_rs: str,
                                   upper: float, lower: float | None = None) -> torch.Tensor:
    """Keep-mask (B, T) of 0/1: 1 where lower <= ρ <= upper at the rollout_rs level (lower None: 1/upper),
    and on the response mask. Sequence / geometric levels keep or drop whole rows."""
    if rollout_rs not in ROLLOUT_RS_LEVELS:
        raise ValueError(f"unknown rollout_rs {rollout_rs!r}; valid: {', '.join(ROLLOUT_RS_LEVELS)}")
    lower = 1.0 / upper if lower is None else lower
    mask = response_mask.to(log_ratio.dtype)
    # compared in log space: exact where exp would saturate
    log_rho = _level_log_ratio(log_ratio, mask, rollout_rs)
    keep = (log_rho >= math.log(lower)) & (log_rho <= math.log(upper))
    return keep.to(mask.dtype) * mask


def compute_token_veto_mask(log_ratio: torch.Tensor, response_mask: torch.Tensor, veto_threshold: float
                            ) -> torch.Tensor:
    """Keep-mask (B, 1): 0 for rows holding a valid token with ρ_it < veto_threshold (catastrophic token)."""
    bad = (log_ratio < math.log(veto_threshold)) & (response_mask > 0)
    return (~bad.any(-1, keepdim=True)).to(log_ratio.dtype)


def _unit_stats(values: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The values of each unit: every valid token (token level) or one per non-empty row (sequence)."""
    if level == "token":
        return values[mask > 0]
    return masked_mean(values, mask, axis=-1)[mask.sum(-1) > 0]  # the row's one value


def compute_rollout_correction(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                               response_mask: torch.Tensor, rollout_is: str | None = None,
                               rollout_is_threshold: float = 2.0, rollout_rs: str | None = None,
                               rollout_rs_threshold: float | None = None,
                               rollout_rs_threshold_lower: float | None = None,
                               rollout_token_veto_threshold: float | None = None
                               ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """(rollout_is_weights (B, T) or None, new response_mask (B, T), metrics) from (B, T) log-probs.

    new mask = response_mask · RS keep · veto keep. Metrics (`rollout_corr/`, verl's names), over this batch:
    kl = mean(rollout - old) = KL(π_rollout ‖ π_old) estimate, k3_kl = mean(ρ - log ρ - 1) (token ρ);
    rollout_is_{mean,max,min,std,eff_sample_size} of the applied (truncated) weights per unit (token, or
    row at sequence level), ESS = (Σw)² / (n·Σw²) in (0, 1]; rollout_is_ratio_fraction_high = units with
    ρ > thr (truncated), _low = units with ρ < 1/thr; rollout_rs_masked_fraction / rollout_rs_seq_masked_fraction
    = valid tokens / non-empty rows removed by RS; rollout_is_veto_fraction = rows vetoed;
    masked_fraction = valid tokens removed by RS and veto together.
    """
    mask = response_mask.to(old_log_prob.dtype)
    log_ratio = (old_log_prob - rollout_log_prob) * mask  # 0 off the mask: padding never matters
    valid_rows = mask.sum(-1) > 0
    n_rows = max(int(valid_rows.sum()), 1)
    metrics: dict[str, float] = {}
    if mask.sum() > 0:
        metrics["rollout_corr/kl"] = masked_mean(-log_ratio, mask).item()
        lr = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        metrics["rollout_corr/k3_kl"] = masked_mean(torch.exp(lr) - lr - 1.0, mask).item()
    weights = None
    if rollout_is is not None:
        weights, rho = compute_rollout_is_weights(log_ratio, mask, rollout_is, rollout_is_threshold)
        w, r = _unit_stats(weights, mask, rollout_is), _unit_stats(rho, mask, rollout_is)
        if w.numel():
            metrics |= {
                "rollout_corr/rollout_is_mean": w.mean().item(), "rollout_corr/rollout_is_max": w.max().item(),
                "rollout_corr/rollout_is_min": w.min().item(),
                "rollout_corr/rollout_is_std": w.std(unbiased=False).item(),
                "rollout_corr/rollout_is_eff_sample_size": (w.sum().square() / (w.numel() * w.square().sum())
                                                            ).item() if w.abs().sum() > 0 else 0.0,
                "rollout_corr/rollout_is_ratio_fraction_high": (r > rollout_is_threshold).double().mean().item(),
                "rollout_corr/rollout_is_ratio_fraction_low": (r < 1.0 / rollout_is_threshold).double().mean().item(),
            }
    new_mask = mask
    if rollout_rs is not None:
        upper = rollout_is_threshold if rollout_rs_threshold is None else rollout_rs_threshold
        new_mask = compute_rollout_rejection_mask(log_ratio, mask, rollout_rs, upper, rollout_rs_threshold_lower)
        metrics["rollout_corr/rollout_rs_masked_fraction"] = masked_mean(1.0 - new_mask, mask).item()
        dropped_rows = valid_rows & (new_mask.sum(-1) < mask.sum(-1))
        metrics["rollout_corr/rollout_rs_seq_masked_fraction"] = dropped_rows.sum().item() / n_rows
    if rollout_token_veto_threshold is not None:
        if not rollout_token_veto_threshold > 0:
            raise ValueError(f"rollout_token_veto_threshold must be > 0, got {rollout_token_veto_threshold}")
        veto = compute_token_veto_mask(log_ratio, mask, rollout_token_veto_threshold)
        metrics["rollout_corr/rollout_is_veto_fraction"] = ((veto[:, 0] == 0) & valid_rows).sum().item() / n_rows
        new_mask = new_mask * veto
    metrics["rollout_corr/masked_fraction"] = masked_mean(1.0 - new_mask, mask).item()
    return weights, new_mask.to(response_mask.dtype), metrics
