"""Policy-loss modes (vanilla, gspo, clip_cov, kl_cov, cispo) and rollout correction (TIS, RS, veto) against
plain Python reference loops over rows and tokens — values and gradients to 1e-6 — and their split invariance."""
import math
import random

import numpy as np
import pytest
import torch

from agentevolver.module.exp_manager.het_core_algos import AGG_LOSS_MODES, count_tokens_and_seqs
from agentevolver.module.exp_manager.policy_losses import (
    POLICY_LOSS_MODES,
    PolicyLossParams,
    clip_cov_select,
    get_policy_loss_fn,
    kl_cov_select,
)
from agentevolver.module.exp_manager.rollout_corr import compute_rollout_correction
from agentevolver.protocol import Batch
from tests.helpers import REPO, lengths_mask, random_partition

TOL = {"rtol": 0, "atol": 1e-6}
# cov bounds wide enough that the random batches below have candidates; ratios large enough that k > 1
PARAMS = PolicyLossParams(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, off_cliprange_high=None, clip_cov_ratio=0.2,
                          clip_cov_lb=-0.5, clip_cov_ub=5.0, kl_cov_ratio=0.15, ppo_kl_coef=0.7)


def batch(seed, B=6, T=9, empty_row=2):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = (torch.randn(B, 1, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(B, T, generator=gen,
                                                                                       dtype=torch.float64))
    lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    lengths[empty_row] = 0
    mask = lengths_mask(lengths, T)
    w = (0.5 + torch.rand(B, T, generator=gen, dtype=torch.float64)) * mask
    return old, logp, adv * mask, mask, w


# ----------------------------------------------------------------------------- reference loops
def valid(mask):
    return [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t] > 0]


def ref_agg(loss, mask, mode):
    """loss: dict (i, t) -> 0-dim tensor. Plain loops, as tests/test_core_algos.reference_agg."""
    rows = sorted({i for i, _ in loss})
    if not rows:
        return torch.zeros((), dtype=torch.float64)
    row_sum = {i: sum(v for (r, _), v in loss.items() if r == i) for i in rows}
    row_len = {i: sum(1 for (r, _) in loss if r == i) for i in rows}
    if mode == "token-mean":
        return sum(row_sum.values()) / len(loss)
    if mode == "seq-mean-token-sum":
        return sum(row_sum.values()) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(row_sum[i] / row_len[i] for i in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(row_sum.values()) / mask.shape[1] / len(rows)
    raise AssertionError(mode)


def ref_cov(adv, logp, mask):
    cells = valid(mask)
    ma = sum(adv[c].item() for c in cells) / len(cells)
    ml = sum(logp[c].item() for c in cells) / len(cells)
    return {c: (adv[c].item() - ma) * (logp[c].item() - ml) for c in cells}


def ref_clip_cov_select(adv, logp, mask, old, p, seed):
    cov = ref_cov(adv, logp, mask)
    cand = []
    for (i, t), c in cov.items():  # row-major, as torch.nonzero
        r = math.exp(logp[i, t].item() - old[i, t].item())
        a = adv[i, t].item()
        clipped = -a * min(max(r, 1 - p.clip_ratio_low), 1 + p.clip_ratio_high) > -a * r
        if not clipped and p.clip_cov_lb < c < p.clip_cov_ub:
            cand.append((i, t))
    k = max(int(p.clip_cov_ratio * len(cov)), 1)
    perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed)).tolist() if cand else []
    return {cand[j] for j in perm[:k]}


def ref_kl_cov_select(adv, logp, mask, p):
    cov = ref_cov(adv, logp, mask)
    k = max(1, int(len(cov) * p.kl_cov_ratio))
    return set(sorted(cov, key=lambda c: -cov[c])[:k])


def ref_loss(mode, old, logp, adv, mask, w, p, agg, chosen=frozenset()):
    """Per-token losses of `mode` written out token by token on 0-dim tensors; returns (pg_loss, {cell: pg})."""
    out = {}
    seq_ratio = {}
    for i in {i for i, _ in valid(mask)}:
        cells = [(r, t) for r, t in valid(mask) if r == i]
        seq_ratio[i] = sum((logp[c] - old[c]).item() for c in cells) / len(cells)
    lo, hi = 1 - p.clip_ratio_low, 1 + p.clip_ratio_high
    for c in valid(mask):
        a, lp, d = adv[c], logp[c], logp[c] - old[c]
        if mode == "vanilla":
            r = torch.exp(d)
            lc = torch.maximum(-a * r, -a * torch.clamp(r, lo, hi))
            pg = torch.minimum(lc, -a * p.clip_ratio_c) if a < 0 else lc
        elif mode == "gspo":
            s = torch.exp(torch.clamp(lp - lp.detach() + seq_ratio[c[0]], max=10.0))
            pg = torch.maximum(-a * s, -a * torch.clamp(s, lo, hi))
        elif mode == "cispo":
            pg = -torch.clamp(torch.exp(d), lo, hi).detach() * a * lp
        elif mode == "clip_cov":
            r = torch.exp(d)
            pg = torch.maximum(-a * r, -a * torch.clamp(r, lo, hi)) * (0.0 if c in chosen else 1.0)
        elif mode == "kl_cov":
            pg = -a * torch.exp(d) + (p.ppo_kl_coef * d.abs() if c in chosen else 0.0)
        out[c] = pg * w[c]
    return ref_agg(out, mask, "seq-mean-token-mean" if mode == "gspo" else agg), out


def run_mode(mode, old, logp, adv, mask, w, agg, **kw):
    leaf = logp.clone().requires_grad_(True)
    out = get_policy_loss_fn(mode)(old, leaf, adv, mask, PARAMS, rollout_is_weights=w, loss_agg_mode=agg, **kw)
    out["pg_loss"].backward()
    return out, leaf.grad


def chosen_cells(mode, old, logp, adv, mask, seed=7):
    if mode == "clip_cov":
        return ref_clip_cov_select(adv, logp, mask, old, PARAMS, seed)
    if mode == "kl_cov":
        return ref_kl_cov_select(adv, logp, mask, PARAMS)
    return frozenset()


def selection_kwargs(mode, seed=7):
    return {"generator": torch.Generator().manual_seed(seed)} if mode == "clip_cov" else {}


@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
@pytest.mark.parametrize("agg", AGG_LOSS_MODES)
def test_mode_matches_reference_loop(mode, agg):
    for seed in range(3):
        old, logp, adv, mask, w = batch(seed)
        for weights in (None, w):
            chosen = chosen_cells(mode, old, logp, adv, mask)
            if mode in ("clip_cov", "kl_cov"):
                assert chosen, "the batch must exercise the covariance selection"
            out, grad = run_mode(mode, old, logp, adv, mask, weights, agg, **selection_kwargs(mode))
            leaf = logp.clone().requires_grad_(True)
            ones = torch.ones_like(mask) if weights is None else weights
            ref, cells = ref_loss(mode, old, leaf, adv, mask, ones, PARAMS, agg, chosen)
            ref.backward()
            assert out["pg_loss"].item() == pytest.approx(ref.item(), abs=1e-6), (mode, agg, seed)
            for c, v in cells.items():
                assert out["pg_losses"][c].item() == pytest.approx(v.item(), abs=1e-6), (mode, c)
            torch.testing.assert_close(grad, leaf.grad, **TOL)
            assert out["ppo_kl"].item() == pytest.approx(
                sum((old[c] - logp[c]).item() for c in valid(mask)) / len(valid(mask)), abs=1e-6)


def test_cov_selections_match_reference():
    old, logp, adv, mask, _ = batch(1)
    chosen = kl_cov_select(adv, logp, mask, PARAMS.kl_cov_ratio)
    assert {tuple(c) for c in torch.nonzero(chosen).tolist()} == ref_kl_cov_select(adv, logp, mask, PARAMS)
    ratio = torch.exp(logp - old)
    ppo_clipped = -adv * ratio.clamp(0.8, 1.28) > -adv * ratio
    chosen = clip_cov_select(adv, logp, mask, ppo_clipped, PARAMS.clip_cov_ratio, PARAMS.clip_cov_lb,
                             PARAMS.clip_cov_ub, torch.Generator().manual_seed(3))
    assert {tuple(c) for c in torch.nonzero(chosen).tolist()} == ref_clip_cov_select(adv, logp, mask, old, PARAMS, 3)
    assert int(chosen.sum()) == max(int(PARAMS.clip_cov_ratio * mask.sum().item()), 1)


def test_gspo_gradient_is_the_sequence_ratio_times_mean_log_prob_gradient():
    # ∇ loss = -(1/B) Σ_i A_i s_i (1/|y_i|) Σ_t ∇logp_it where unclipped (GSPO eq. 10), 0 where clipped
    old, logp, adv, mask, _ = batch(5)
    adv = adv[:, :1].expand_as(adv) * mask  # one advantage per sequence, as GRPO gives
    _, grad = run_mode("gspo", old, logp, adv, mask, None, "token-mean")
    rows = [i for i in range(mask.shape[0]) if mask[i].sum() > 0]
    for i in range(mask.shape[0]):
        n = mask[i].sum().item()
        s = math.exp(sum((logp[i, t] - old[i, t]).item() for t in range(mask.shape[1]) if mask[i, t]) / max(n, 1))
        a = adv[i, 0].item()
        clipped = -a * min(max(s, 0.8), 1.28) > -a * s
        for t in range(mask.shape[1]):
            expect = 0.0 if (not mask[i, t] or clipped) else -a * s / n / len(rows)
            assert grad[i, t].item() == pytest.approx(expect, abs=1e-9)


# ----------------------------------------------------------------------------- split invariance
@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
@pytest.mark.parametrize("agg", AGG_LOSS_MODES)
def test_every_mode_is_split_invariant_given_its_selection(mode, agg):
    """Pieces aggregated with the global counts sum to the whole-batch value and gradient, for any row
    partition. gspo: s_i reads only row i (rows are never cut). clip_cov / kl_cov: with the selection
    of the whole batch handed to each piece (cov_mask), the loss is token-local."""
    old, logp, adv, mask, w = batch(11, B=8)
    cov = {}
    if mode == "clip_cov":
        ratio = torch.exp(logp - old)
        cov["cov_mask"] = clip_cov_select(adv, logp, mask, -adv * ratio.clamp(0.8, 1.28) > -adv * ratio,
                                          PARAMS.clip_cov_ratio, PARAMS.clip_cov_lb, PARAMS.clip_cov_ub,
                                          torch.Generator().manual_seed(0))
    elif mode == "kl_cov":
        cov["cov_mask"] = kl_cov_select(adv, logp, mask, PARAMS.kl_cov_ratio)
    whole, whole_grad = run_mode(mode, old, logp, adv, mask, w, agg, **cov)
    rng = random.Random(4)
    B = mask.shape[0]
    for pieces in [[[i] for i in range(B)], [list(range(B))], [[0, 1, 2], [3, 4, 5, 6, 7]]] + \
            [random_partition(B, rng) for _ in range(5)]:
        counts = [count_tokens_and_seqs(mask[idx]) for idx in pieces]
        tokens, seqs = sum(c[0] for c in counts), sum(c[1] for c in counts)
        leaf = logp.clone().requires_grad_(True)
        fn = get_policy_loss_fn(mode)
        total = sum(fn(old[idx], leaf[idx], adv[idx], mask[idx], PARAMS, rollout_is_weights=w[idx],
                       loss_agg_mode=agg, global_tokens=tokens, global_seqs=seqs,
                       **{k: v[idx] for k, v in cov.items()})["pg_loss"] for idx in pieces)
        total.backward()
        assert total.item() == pytest.approx(whole["pg_loss"].item(), abs=1e-9), (mode, pieces)
        torch.testing.assert_close(leaf.grad, whole_grad, rtol=0, atol=1e-9)


def test_cov_selection_per_piece_depends_on_the_piece():
    """What clip_cov / kl_cov guarantee when each micro-batch selects for itself (verl's behaviour): the
    whole batch as one piece is the whole-batch loss, and the choice does not depend on the ORDER of rows
    in a piece — but a different cut changes the centring means and k, hence the update."""
    _, logp, adv, mask, _ = batch(2, B=8)
    chosen = kl_cov_select(adv, logp, mask, PARAMS.kl_cov_ratio)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kl_cov_select(adv[perm], logp[perm], mask[perm], PARAMS.kl_cov_ratio), chosen[perm])
    halves = torch.cat([kl_cov_select(adv[rows], logp[rows], mask[rows], PARAMS.kl_cov_ratio)
                        for rows in (slice(0, 4), slice(4, 8))])
    assert not torch.equal(halves, chosen)  # not micro-batch invariant: documented, measured here


# ----------------------------------------------------------------------------- registry
def test_registry_is_the_only_dispatch_and_lists_valid_modes():
    assert POLICY_LOSS_MODES == ("vanilla", "gspo", "clip_cov", "kl_cov", "cispo")
    with pytest.raises(ValueError) as err:
        get_policy_loss_fn("sapo")
    assert all(m in str(err.value) for m in POLICY_LOSS_MODES)


def test_vanilla_is_dapo_with_weights_scaling_the_per_token_loss():
    old, logp, adv, mask, w = batch(3)
    plain, plain_grad = run_mode("vanilla", old, logp, adv, mask, None, "token-mean")
    weighted, weighted_grad = run_mode("vanilla", old, logp, adv, mask, w, "token-mean")
    torch.testing.assert_close(weighted["pg_losses"], plain["pg_losses"] * w, **TOL)
    torch.testing.assert_close(weighted_grad, plain_grad * w, **TOL)
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):  # weights never change the diagnostics
        assert weighted[key].item() == plain[key].item()


# ----------------------------------------------------------------------------- rollout correction
def rollout_batch(seed, B=7, T=10):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    lengths[1] = 0
    mask = lengths_mask(lengths, T)
    rollout = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    old = rollout + 0.35 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    old[3, 0] = rollout[3, 0] - 6.0  # one catastrophic token (ratio e^-6)
    return old * mask, rollout * mask, mask.long()


def ref_correction(old, rollout, mask, is_level, thr, rs_level, upper, lower, veto):
    B = mask.shape[0]
    rows = [i for i in range(B) if mask[i].sum() > 0]
    cells = valid(mask)
    d = {c: old[c].item() - rollout[c].item() for c in cells}
    seq = {i: sum(v for (r, _), v in d.items() if r == i) for i in rows}
    geo = {i: seq[i] / sum(1 for (r, _) in d if r == i) for i in rows}
    keep = {c: 1.0 for c in cells}
    weights, raw = {}, {}
    for c in cells:
        log_rho = d[c] if is_level == "token" else seq[c[0]]
        raw[c] = math.exp(max(min(log_rho, 20), -20))
        weights[c] = min(raw[c], thr)
    if rs_level:
        lower = 1 / upper if lower is None else lower
        for c in cells:
            lr = {"token": d[c], "sequence": seq[c[0]], "geometric": geo[c[0]]}[rs_level]
            if not math.log(lower) <= lr <= math.log(upper):
                keep[c] = 0.0
    vetoed = set()
    if veto is not None:
        vetoed = {i for (i, t) in cells if d[(i, t)] < math.log(veto)}
        for c in cells:
            if c[0] in vetoed:
                keep[c] = 0.0
    units = cells if is_level == "token" else [next(c for c in cells if c[0] == i) for i in rows]
    ws = [weights[u] for u in units]
    mean = sum(ws) / len(ws)
    metrics = {"kl": -sum(d.values()) / len(d), "rollout_is_mean": mean, "rollout_is_max": max(ws),
               "rollout_is_std": math.sqrt(sum((x - mean) ** 2 for x in ws) / len(ws)),
               "rollout_is_eff_sample_size": sum(ws) ** 2 / (len(ws) * sum(x * x for x in ws)),
               "rollout_is_ratio_fraction_high": sum(raw[u] > thr for u in units) / len(units),
               "masked_fraction": sum(1 - v for v in keep.values()) / len(cells),
               "k3_kl": sum(math.exp(v) - v - 1 for v in d.values()) / len(d)}
    if veto is not None:
        metrics["rollout_is_veto_fraction"] = len(vetoed) / len(rows)
    return weights, keep, metrics


CORRECTIONS = [  # (rollout_is, threshold, rollout_rs, rs upper, rs lower, veto)
    ("token", 1.2, None, None, None, None),         # token TIS
    ("sequence", 1.5, None, None, None, None),      # sequence TIS
    ("token", 2.0, "token", 1.4, 0.7, None),        # token IS + token RS (MIS-style)
    ("sequence", 2.0, "sequence", 3.0, None, 1e-2),  # sequence IS + sequence RS + veto
    ("token", 1.5, "geometric", 1.1, 0.9, None),    # geometric RS
]


@pytest.mark.parametrize("case", CORRECTIONS, ids=[f"{c[0]}-{c[2]}-veto{c[5]}" for c in CORRECTIONS])
def test_rollout_correction_matches_reference_loop(case):
    is_level, thr, rs_level, upper, lower, veto = case
    old, rollout, mask = rollout_batch(0)
    weights, new_mask, metrics = compute_rollout_correction(old, rollout, mask, is_level, thr, rs_level, upper,
                                                            lower, veto)
    ref_w, ref_keep, ref_m = ref_correction(old, rollout, mask, is_level, thr, rs_level, upper, lower, veto)
    assert new_mask.dtype == mask.dtype
    for c in valid(mask):
        assert weights[c].item() == pytest.approx(ref_w[c], abs=1e-6), c
        assert new_mask[c].item() == ref_keep[c], c
    assert (weights[mask == 0] == 0).all() and (new_mask[mask == 0] == 0).all()
    for key, value in ref_m.items():
        assert metrics[f"rollout_corr/{key}"] == pytest.approx(value, abs=1e-6), key
    assert 0 < metrics["rollout_corr/rollout_is_eff_sample_size"] <= 1
    if rs_level or veto:
        assert 0 < metrics["rollout_corr/masked_fraction"] < 1  # the cases do reject something


def test_weights_on_the_loss_match_the_reference_with_the_new_mask():
    old_lp, rollout, mask = rollout_batch(4)
    weights, new_mask, _ = compute_rollout_correction(old_lp, rollout, mask, "token", 1.3, "token", 1.6, None, 1e-2)
    gen = torch.Generator().manual_seed(9)
    logp = old_lp + 0.3 * torch.randn(old_lp.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(old_lp.shape[0], 1, generator=gen, dtype=torch.float64).expand_as(old_lp) * mask
    m = new_mask.double()
    for mode in POLICY_LOSS_MODES:
        out, grad = run_mode(mode, old_lp, logp, adv, m, weights, "token-mean", **selection_kwargs(mode))
        leaf = logp.clone().requires_grad_(True)
        ref, _ = ref_loss(mode, old_lp, leaf, adv, m, weights, PARAMS, "token-mean",
                          chosen_cells(mode, old_lp, logp, adv, m))
        ref.backward()
        assert out["pg_loss"].item() == pytest.approx(ref.item(), abs=1e-6), mode
        torch.testing.assert_close(grad, leaf.grad, **TOL)


def test_no_correction_keeps_the_mask_and_reports_kl():
    old, rollout, mask = rollout_batch(1)
    weights, new_mask, metrics = compute_rollout_correction(old, rollout, mask)
    assert weights is None and torch.equal(new_mask, mask)
    assert metrics["rollout_corr/masked_fraction"] == 0.0
    assert metrics["rollout_corr/kl"] == pytest.approx(((rollout - old) * mask).sum().item() / mask.sum().item())
    same, _, zero = compute_rollout_correction(rollout, rollout, mask, "token", 2.0)
    assert torch.equal(same, mask.double()) and zero["rollout_corr/kl"] == 0.0
    assert zero["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token, sequence"):
        compute_rollout_correction(old, rollout, mask, "geometric")


# ----------------------------------------------------------------------------- the trainer's batch contract
class LogProbWorkers:
    """The one worker call this stage makes: old log-probs for the batch's rows (here: known values)."""

    def __init__(self, old):
        self.old, self.calls, self.rows = old, 0, []

    def compute_log_prob(self, batch):  # answers in reversed row order: the trainer must join by traj_id
        self.calls += 1
        ids = batch.ids["traj_id"][::-1]
        self.rows.append(sorted(int(t[1:]) for t in ids))
        return Batch({"old_log_probs": self.old[[int(t[1:]) for t in ids]]}, {"traj_id": ids})


def trainer_stage(overrides, old, rollout, mask, exp_mask=None, workers=None):
    from omegaconf import OmegaConf

    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    trainer = RayTrainer.__new__(RayTrainer)  # only the old-log-prob stage: no Ray, no workers started
    trainer.cfg = OmegaConf.merge(OmegaConf.load(REPO / "config" / "base.yaml"), OmegaConf.from_dotlist(overrides))
    trainer.workers = workers or LogProbWorkers(old)
    tensors = {"rollout_log_probs": rollout, "response_mask": mask} | ({} if exp_mask is None else {"exp_mask": exp_mask})
    batch = Batch(tensors, {"traj_id": np.array([f"t{i}" for i in range(len(mask))])})
    metrics = {}
    return trainer._compute_old_log_prob(batch, metrics), metrics, trainer.workers.calls


def test_trainer_adds_weights_and_mask_and_bypass_skips_the_pass():
    old, rollout, mask = rollout_batch(0)
    out, metrics, calls = trainer_stage([], old, rollout, mask)
    assert calls == 1 and "rollout_is_weights" not in out and torch.equal(out["response_mask"], mask)
    assert metrics["rollout_corr/kl"] == pytest.approx(((rollout - old) * mask).sum().item() / mask.sum().item())
    corr = "algorithm.rollout_correction"
    out, metrics, _ = trainer_stage([f"{corr}.rollout_is=token", f"{corr}.rollout_is_threshold=1.2",
                                     f"{corr}.rollout_rs=token", f"{corr}.rollout_rs_threshold=1.4"], old, rollout, mask)
    weights, new_mask, expect = compute_rollout_correction(old, rollout, mask, "token", 1.2, "token", 1.4)
    assert torch.equal(out["rollout_is_weights"], weights) and torch.equal(out["response_mask"], new_mask)
    assert all(metrics[k] == v for k, v in expect.items()) and expect["rollout_corr/masked_fraction"] > 0
    assert torch.equal(out["old_log_probs"], old)
    out, metrics, calls = trainer_stage([f"{corr}.bypass_mode=true"], old, rollout, mask)
    assert calls == 0 and torch.equal(out["old_log_probs"], rollout) and torch.equal(out["response_mask"], mask)
    assert not any(k.startswith("rollout_corr/") for k in metrics)


def test_bypass_recomputes_only_the_rows_with_exp_mask():
    """Replayed / teacher / guided rows were not sampled by this policy on this prompt: in bypass_mode
    only they get the actor's pass, and their old log-probs land on their own rows (joined by traj_id)."""
    old, rollout, mask = rollout_batch(2)
    exp_mask = torch.zeros_like(mask)
    exp_mask[4] = mask[4]
    exp_mask[6] = mask[6]
    workers = LogProbWorkers(old)
    out, metrics, calls = trainer_stage(["algorithm.rollout_correction.bypass_mode=true"], old, rollout, mask,
                                        exp_mask, workers)
    assert calls == 1 and workers.rows == [[4, 6]] and metrics["rollout/bypass_recomputed_rows"] == 2
    expect = rollout.clone()
    expect[[4, 6]] = old[[4, 6]]
    assert torch.equal(out["old_log_probs"], expect) and torch.equal(out["response_mask"], mask)
    out, metrics, calls = trainer_stage(["algorithm.rollout_correction.bypass_mode=true"], old, rollout, mask,
                                        torch.zeros_like(mask))
    assert calls == 0 and torch.equal(out["old_log_probs"], rollout) and metrics["rollout/bypass_recomputed_rows"] == 0
