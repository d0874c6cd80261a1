"""DAPO / GRPO core algorithms as pure tensor functions. Shapes: B rows, T response tokens.

The policy loss is verl's vanilla PPO loss with DAPO's decoupled clip ("clip-higher",
https://arxiv.org/abs/2503.14476) and dual-clip (https://arxiv.org/abs/1912.09729); `agg_loss`
turns the per-token matrix into a scalar and, given the *global* token / sequence counts of the
mini-batch, returns each micro-batch's exact share, so micro-batches and data-parallel ranks add up
to the whole-batch loss and gradient (README, "How token-mean is exact"). `get_policy_loss_fn` is the one
registry of policy losses (verl's `actor.policy_loss.loss_mode`): vanilla (the DAPO loss above), gspo,
clip_cov, kl_cov, cispo.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Denominator = int | float | torch.Tensor | None
ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


# ----------------------------------------------------------------------------- masked statistics
def _safe_div(num: torch.Tensor, den: float | torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (then num is 0 too: nothing was counted). Never NaN."""
    if isinstance(den, torch.Tensor):
        den = den.to(device=num.device, dtype=num.dtype)
        return num / torch.where(den == 0, torch.ones_like(den), den)
    return num / (den if den != 0 else 1.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Σ values·mask over `axis` (all elements when None). values, mask: (B, T)."""
    mask = mask.to(values.dtype)
    if axis is None:
        # one fused pass (BLAS dot) instead of a temporary product followed by a reduction
        return torch.dot(values.reshape(-1), mask.reshape(-1))
    return (values * mask).sum(axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Σ values·mask / Σ mask over `axis`; 0 (not NaN) where the mask is all zero. (B, T) -> scalar | (B,)."""
    mask = mask.to(values.dtype)
    count = mask.sum() if axis is None else mask.sum(axis)
    return _safe_div(masked_sum(values, mask, axis), count)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Masked variance over all elements (Bessel-corrected when unbiased and Σ mask > 1)."""
    mask = mask.to(values.dtype)
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered * centered, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with masked statistics; mean added back if not shift_mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------- loss aggregation
def _num_seqs(mask: torch.Tensor) -> torch.Tensor:
    """Rows with at least one valid token (empty rows are not sequences)."""
    return (mask.sum(-1) > 0).sum()


def _token_mean(loss: torch.Tensor, mask: torch.Tensor, tokens: Denominator, seqs: Denominator,
                scale: float) -> torch.Tensor:
    """Σ L·M / N_tokens."""
    return _safe_div(masked_sum(loss, mask), mask.sum() if tokens is None else tokens)


def _seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, tokens: Denominator, seqs: Denominator,
                        scale: float) -> torch.Tensor:
    """(1/B) Σ_i Σ_t L·M."""
    return _safe_div(masked_sum(loss, mask), _num_seqs(mask) if seqs is None else seqs)


def _seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, tokens: Denominator, seqs: Denominator,
                         scale: float) -> torch.Tensor:
    """(1/B) Σ_i (Σ_t L·M / Σ_t M); empty rows contribute 0 and are not counted in B."""
    row_means = masked_mean(loss, mask, axis=-1)  # (B,)
    return _safe_div(row_means.sum(), _num_seqs(mask) if seqs is None else seqs)


def _seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, tokens: Denominator,
                             seqs: Denominator, scale: float) -> torch.Tensor:
    """(1/B) Σ_i Σ_t L·M / T with a constant T (Dr. GRPO, https://arxiv.org/abs/2503.20783)."""
    return _safe_div(masked_sum(loss, mask) / scale, _num_seqs(mask) if seqs is None else seqs)


_AGG_LOSS_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
AGG_LOSS_MODES: tuple[str, ...] = tuple(_AGG_LOSS_FNS)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str,
             global_tokens: Denominator = None, global_seqs: Denominator = None,
             loss_scale_factor: float | None = None) -> torch.Tensor:
    """Aggregate a per-token loss (B, T) with a 0/1 mask (B, T) into a scalar.

    token-mean: Σ L·M / Σ M;  seq-mean-token-sum: (1/B) Σ_i Σ_t L·M;
    seq-mean-token-mean: (1/B) Σ_i (Σ_t L·M / Σ_t M);  seq-mean-token-sum-norm: (1/B) Σ L·M / T.
    B counts rows with >= 1 valid token; T = loss_scale_factor (default loss_mat.shape[-1]).
    With global_tokens (token-mean) / global_seqs (seq-* modes) = the counts of the whole mini-batch
    (see `count_tokens_and_seqs`), the result is this piece's share: pieces sum to the whole-batch
    value and gradient for any partition of rows. An empty mask gives 0, never NaN.
    """
    fn = _AGG_LOSS_FNS.get(loss_agg_mode)
    if fn is None:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {', '.join(AGG_LOSS_MODES)}")
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    scale = float(loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    if scale <= 0:
        raise ValueError(f"loss_scale_factor must be > 0, got {loss_scale_factor}")
    return fn(loss_mat, loss_mask.to(loss_mat.dtype), global_tokens, global_seqs, scale)


def count_tokens_and_seqs(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid tokens, rows with >= 1 valid token) of a 0/1 mask (B, T), as exact int64 scalars.

    Sum these over micro-batches and all-reduce (SUM) over ranks to get agg_loss's global counts.
    """
    valid = loss_mask != 0
    return valid.sum(), valid.any(-1).sum()


# ----------------------------------------------------------------------------- policy loss
def _apply_is_weights(pg: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    """pg · w with w detached (the IS weight is a constant of the sample, never differentiated)."""
    if rollout_is_weights is None:
        return pg
    return pg * rollout_is_weights.detach().to(pg.dtype)


def _clip_losses(neg_adv: torch.Tensor, ratio: torch.Tensor, adv_neg: torch.Tensor, low: float,
                 high: float, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token DAPO loss: l_clip = max(-A·r, -A·clip(r, 1-eps_low, 1+eps_high)), dual-clip
    min(l_clip, -A·c) where A < 0. Returns (pg, l1, l_clip) — the last two for the clip metrics."""
    l1 = neg_adv * ratio
    l_clip = torch.maximum(l1, neg_adv * ratio.clamp(1.0 - low, 1.0 + high))
    pg = torch.where(adv_neg, torch.minimum(l_clip, neg_adv * c), l_clip)
    return pg, l1, l_clip


def dapo_compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, exp_mask: torch.Tensor | None = None,
                             cliprange_low: float = 0.2, cliprange_high: float = 0.28,
                             clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                             off_cliprange_high: float | None = None, global_tokens: Denominator = None,
                             global_seqs: Denominator = None, loss_scale_factor: float | None = None,
                             rollout_is_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DAPO clipped policy-gradient loss (loss_mode `vanilla`). All inputs (B, T); exp_mask 1 = off-policy
    experience token; rollout_is_weights (B, T) = detached rollout-correction weights w (None = 1).

    ratio = exp(clamp(logp - old_logp, -20, 20)); l1 = -A·ratio; l2 = -A·clip(ratio, 1-eps_low, 1+eps_high);
    l_clip = max(l1, l2); pg = min(l_clip, -A·c) where A < 0 else l_clip;
    off-policy tokens use eps_high = off_cliprange_high: pg = pg_off·exp_mask + pg_on·(1 - exp_mask);
    pg = pg·w (rollout correction, verl's `pg_losses * rollout_is_weights`).
    pg_loss = agg_loss(pg, response_mask, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor).
    Metrics (detached, masked means over response_mask of this piece): pg_clipfrac (l2 > l1),
    pg_clipfrac_lower (dual clip active: A < 0 and l_clip > -A·c), ppo_kl = mean(old_logp - logp).
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip bound on -A·ratio), got {clip_ratio_c}")
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    neg_adv = -advantages
    adv_neg = advantages < 0
    pg, l1, l_clip = _clip_losses(neg_adv, ratio, adv_neg, cliprange_low, cliprange_high, clip_ratio_c)
    off_high = cliprange_high if off_cliprange_high is None else off_cliprange_high
    weight = None
    if exp_mask is not None and off_high != cliprange_high:
        weight = exp_mask.to(pg.dtype)
        pg_off, l1_off, l_clip_off = _clip_losses(neg_adv, ratio, adv_neg, cliprange_low, off_high,
                                                  clip_ratio_c)
        pg_on = pg
        pg = pg_off * weight + pg_on * (1.0 - weight)
    unweighted = pg  # the clip metrics compare losses before the IS weights

    pg = _apply_is_weights(pg, rollout_is_weights)
    n_tokens = mask.sum()
    tokens = n_tokens if global_tokens is None else global_tokens
    pg_loss = agg_loss(pg, mask, loss_agg_mode, tokens, global_seqs, loss_scale_factor)

    with torch.no_grad():  # metrics reuse the intermediates; no graph, no extra grad work
        # comparisons written straight into one reused float buffer: bool + cast is ~5x slower on CPU
        buf = torch.empty_like(mask)

        def frac(fn: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return _safe_div(masked_sum(fn(a.detach(), b.detach(), out=buf), mask), n_tokens)

        # dual clip bites exactly where pg = min(l_clip, -A·c) < l_clip
        if weight is None:
            clipfrac, clipfrac_lower = frac(torch.gt, l_clip, l1), frac(torch.lt, unweighted, l_clip)
        else:  # token-wise merge of the on- and off-policy flags, like the loss
            def merged(on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
                flag = on.to(weight.dtype).lerp(off.to(weight.dtype), weight)
                return _safe_div(masked_sum(flag, mask), n_tokens)

            clipfrac = merged(l_clip > l1, l_clip_off > l1_off)
            clipfrac_lower = merged(pg_on < l_clip, pg_off < l_clip_off)
        metrics = {
            "pg_clipfrac": clipfrac,
            "pg_clipfrac_lower": clipfrac_lower,
            "ppo_kl": _safe_div(-masked_sum(log_ratio.detach(), mask), n_tokens),
        }
    return {"pg_loss": pg_loss, "pg_losses": pg, **metrics}


# ----------------------------------------------------------------------------- policy-loss registry
@dataclass(frozen=True)
class PolicyLossParams:
    """The knobs of every loss mode (actor_rollout_ref.actor.* and .policy_loss.*, verl's names)."""
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    off_cliprange_high: float | None = None
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1


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
                                response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(), *,
                                exp_mask: torch.Tensor | None = None,
                                rollout_is_weights: torch.Tensor | None = None, loss_agg_mode: str = "token-mean",
                                global_tokens: Denominator = None, global_seqs: Denominator = None,
                                loss_scale_factor: float | None = None) -> dict[str, torch.Tensor]:
    """`vanilla`: `dapo_compute_policy_loss` (clip-higher + dual-clip + exp_mask) with `params`."""
    return dapo_compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, exp_mask=exp_mask, cliprange_low=params.clip_ratio_low,
        cliprange_high=params.clip_ratio_high, clip_ratio_c=params.clip_ratio_c, loss_agg_mode=loss_agg_mode,
        off_cliprange_high=params.off_cliprange_high, global_tokens=global_tokens, global_seqs=global_seqs,
        loss_scale_factor=loss_scale_factor, rollout_is_weights=rollout_is_weights)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(), *,
                             exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                             loss_agg_mode: str = "token-mean", global_tokens: Denominator = None,
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
                              response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(), *,
                              exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                              loss_agg_mode: str = "token-mean", global_tokens: Denominator = None,
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
                                 response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(), *,
                                 exp_mask: torch.Tensor | None = None,
                                 rollout_is_weights: torch.Tensor | None = None, loss_agg_mode: str = "token-mean",
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
                               response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(), *,
                               exp_mask: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                               loss_agg_mode: str = "token-mean", global_tokens: Denominator = None,
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


# ----------------------------------------------------------------------------- KL and entropy
def _kl_k1(logprob: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return logprob - ref


def _kl_abs(logprob: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (logprob - ref).abs()


def _kl_k2(logprob: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprob - ref).square()


def _kl_k3(logprob: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # http://joschu.net/blog/kl-approx.html ; clamps as in verl keep exp() and the estimate bounded
    log_r = torch.clamp(ref - logprob, -20.0, 20.0)
    return torch.clamp(torch.exp(log_r) - log_r - 1.0, -10.0, 10.0)


_KL_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": _kl_k1, "k1": _kl_k1, "abs": _kl_abs, "mse": _kl_k2, "k2": _kl_k2,
    "low_var_kl": _kl_k3, "k3": _kl_k3,
}
KL_PENALTIES: tuple[str, ...] = tuple(_KL_FNS)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate, (B, T) -> (B, T), with d = logp - ref_logp:
    kl/k1: d;  abs: |d|;  mse/k2: d²/2;  low_var_kl/k3: clamp(exp(-d) + d - 1, -10, 10) (d clamped to ±20).
    """
    fn = _KL_FNS.get(kl_penalty)
    if fn is None:
        raise ValueError(f"unknown kl_penalty {kl_penalty!r}; valid: {', '.join(KL_PENALTIES)}")
    return fn(logprob, ref_logprob)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: logsumexp(z) - Σ softmax(z)·z. (..., V) -> (...)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# ----------------------------------------------------------------------------- group advantages
def _group_ids(index: Sequence[Hashable] | np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary hashable group ids to 0..G-1 (first-seen order)."""
    seen: dict[Hashable, int] = {}
    gid = np.fromiter((seen.setdefault(x, len(seen)) for x in index), dtype=np.int64)
    return gid, len(seen)


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
                                   index: Sequence[Hashable] | np.ndarray, norm_adv_by_std_in_grpo: bool = True,
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
                                   index: Sequence[Hashable] | np.ndarray, norm_adv_by_std_in_grpo: bool = True,
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


# ----------------------------------------------------------------------------- dynamic sampling
# Each mode maps per-group flags (all_equal, all_correct, none_correct) to the groups it drops.
_DROP_RULES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "none": lambda equal, all_ok, none_ok: np.zeros_like(equal),
    "strict": lambda equal, all_ok, none_ok: equal,
    "remove_all_correct": lambda equal, all_ok, none_ok: all_ok,
    "remove_all_incorrect": lambda equal, all_ok, none_ok: none_ok,
}
DYNAMIC_SAMPLING_MODES: tuple[str, ...] = tuple(_DROP_RULES)
# dynamic_sampling.metric -> the per-episode id column that must vary within a group
DYNAMIC_SAMPLING_METRICS: dict[str, str] = {"acc": "won", "score": "score"}


def filter_groups(scores: ArrayLike, index: Sequence[Hashable] | np.ndarray, mode: str
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """DAPO dynamic sampling: which rows (B,) to keep, by group (rows sharing index[i]).

    A row is correct when its score > 0. strict: drop groups whose scores are all equal (zero variance,
    incl. groups of one — their GRPO advantage is 0); remove_all_correct: drop groups where every row is
    correct; remove_all_incorrect: drop groups with no correct row; none: keep all.
    Returns (keep: bool (B,), metrics).
    """
    if mode not in _DROP_RULES:
        raise ValueError(f"unknown dynamic sampling mode {mode!r}; valid: {', '.join(DYNAMIC_SAMPLING_MODES)}")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    gid, groups = _group_ids(index)
    if len(gid) != len(s):
        raise ValueError(f"index has {len(gid)} ids but scores has {len(s)} rows")
    count = np.bincount(gid, minlength=groups)
    high = np.full(groups, -np.inf)
    low = np.full(groups, np.inf)
    np.maximum.at(high, gid, s)
    np.minimum.at(low, gid, s)
    n_correct = np.bincount(gid, weights=(s > 0).astype(np.float64), minlength=groups)
    equal, all_ok, none_ok = high == low, n_correct == count, n_correct == 0
    drop = _DROP_RULES[mode](equal, all_ok, none_ok)
    keep = ~drop[gid]
    metrics = {
        "dynamic_sampling/groups": float(groups),
        "dynamic_sampling/kept_groups": float(groups - drop.sum()),
        "dynamic_sampling/kept_rows": float(keep.sum()),
        "dynamic_sampling/solve_all": float(all_ok.sum()),
        "dynamic_sampling/solve_none": float(none_ok.sum()),
        "dynamic_sampling/zero_var": float(equal.sum()),
    }
    return keep, metrics


# ----------------------------------------------------------------------------- reward shaping
def overlong_penalty(response_lengths: ArrayLike, max_length: int, buffer_length: int,
                     penalty_factor: float) -> torch.Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13) scaled by penalty_factor, (B,) -> (B,):
    p(L) = 0 for L <= max - buffer; -factor·(L - (max - buffer))/buffer up to L = max; -factor beyond."""
    if max_length <= 0 or not 0 <= buffer_length <= max_length:
        raise ValueError(f"need max_length > 0 and 0 <= buffer_length <= max_length, got {max_length}, "
                         f"{buffer_length}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    if buffer_length == 0:
        ramp = (lengths > max_length).to(torch.float32)
    else:
        ramp = ((lengths - (max_length - buffer_length)) / buffer_length).clamp(0.0, 1.0)
    return ramp * -penalty_factor


def _shape_additive(s: torch.Tensor, p: torch.Tensor, cap: float) -> torch.Tensor:
    return s + p


def _shape_multiplicative(s: torch.Tensor, p: torch.Tensor, cap: float) -> torch.Tensor:
    if bool(((p < -1) | (p > 0)).any()):
        raise ValueError("multiplicative reward shaping needs penalties in [-1, 0] (penalty_factor <= 1)")
    return s * (1.0 + p)


def _shape_replace_if_positive(s: torch.Tensor, p: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.where((p < 0) & (s > 0), p, s + p)


def _shape_cap(s: torch.Tensor, p: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.where(p < 0, s.clamp(max=cap), s)


_SHAPING_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "additive": _shape_additive,
    "multiplicative": _shape_multiplicative,
    "replace_if_positive": _shape_replace_if_positive,
    "cap": _shape_cap,
}
REWARD_SHAPING_MODES: tuple[str, ...] = tuple(_SHAPING_FNS)


def apply_reward_shaping(scores: ArrayLike, penalty: ArrayLike, mode: str, cap: float = 0.0) -> torch.Tensor:
    """Combine per-row scores s (B,) with penalties p <= 0 (B,), e.g. from `overlong_penalty`.

    additive: s + p (DAPO);  multiplicative: s·(1 + p), p in [-1, 0] (a truncated success keeps a
    fraction of its reward);  replace_if_positive: p where p < 0 and s > 0, else s + p (a penalised
    row never ends positive);  cap: min(s, cap) where p < 0, else s (truncation caps the reward).
    """
    fn = _SHAPING_FNS.get(mode)
    if fn is None:
        raise ValueError(f"unknown reward shaping mode {mode!r}; valid: {', '.join(REWARD_SHAPING_MODES)}")
    s = torch.as_tensor(scores, dtype=torch.float32) if not isinstance(scores, torch.Tensor) else scores
    p = torch.as_tensor(penalty).to(device=s.device, dtype=s.dtype)
    if p.shape != s.shape:
        raise ValueError(f"scores {tuple(s.shape)} and penalty {tuple(p.shape)} differ in shape")
    return fn(s, p, cap)
