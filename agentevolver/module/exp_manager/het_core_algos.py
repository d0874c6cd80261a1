"""DAPO / GRPO core algorithms as pure tensor functions. Shapes: B rows, T response tokens.

The policy loss is verl's vanilla PPO loss with DAPO's decoupled clip ("clip-higher",
https://arxiv.org/abs/2503.14476) and dual-clip (https://arxiv.org/abs/1912.09729); `agg_loss`
turns the per-token matrix into a scalar and, given the *global* token / sequence counts of the
mini-batch, returns each micro-batch's exact share, so micro-batches and data-parallel ranks add up
to the whole-batch loss and gradient (README, "How token-mean is exact"). Also here: KL penalties, entropy,
DAPO dynamic sampling (`filter_groups`) and reward shaping. Configured values (clip ratios, aggregation mode)
have no defaults here: they come from base.yaml through the caller.
The registries live beside: policy_losses.py (`get_policy_loss_fn`: vanilla = the DAPO loss here, gspo,
clip_cov, kl_cov, cispo) and advantages.py (`compute_advantage`: grpo, rloo, gigpo).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

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
                             response_mask: torch.Tensor, exp_mask: torch.Tensor | None = None, *,
                             cliprange_low: float, cliprange_high: float, clip_ratio_c: float, loss_agg_mode: str,
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


def self_imitation_loss(log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                        exp_mask: torch.Tensor, loss_agg_mode: str, global_tokens: Denominator = None,
                        global_seqs: Denominator = None, loss_scale_factor: float | None = None) -> torch.Tensor:
    """Self-imitation (SIL, Oh et al. 2018, https://arxiv.org/abs/1806.05635) on off-policy tokens. (B, T).

    M_imit = response_mask · exp_mask · [A > 0] (replayed or teacher successes);
    L_imit = agg_loss(-logp, M_imit, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor).
    With the mini-batch's global counts it is a share on the same denominators as pg_loss (like
    actor/pg_loss_off), so actor.imitation_coef · L_imit adds to it for any micro-batch split. The NLL is
    not clipped: where the ratio clip stops the policy gradient of a success the policy has never
    sampled, this term still pulls toward it.
    """
    imitate = response_mask.to(log_prob.dtype) * exp_mask.to(log_prob.dtype) * (advantages > 0).to(log_prob.dtype)
    return agg_loss(-log_prob, imitate, loss_agg_mode, global_tokens, global_seqs, loss_scale_factor)


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


def _group_ids(index: Sequence[Hashable] | np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary hashable group ids to 0..G-1 (first-seen order)."""
    seen: dict[Hashable, int] = {}
    gid = np.fromiter((seen.setdefault(x, len(seen)) for x in index), dtype=np.int64)
    return gid, len(seen)


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
