"""The actor: response-token log-probs and the DAPO / SFT update of an FSDP2-wrapped HF causal LM.

Split invariance (README, "How token-mean is exact"; tests/test_dist_token_mean.py): every
micro-batch's loss is aggregated with the GLOBAL valid-token / valid-row counts of its mini-batch
(summed over the rank's pieces and all-reduced once), and multiplied by world_size because FSDP
averages gradients over ranks. The accumulated gradient is then exactly the
gradient of the whole mini-batch loss, for any micro-batch size and any number of ranks.

FSDP2 all-gathers parameters in every forward, so all ranks must run the same number of forward /
backward calls: ranks holding fewer rows are padded with dummy rows whose loss mask is 0 (they add
exactly 0 to the loss and the gradient).

Shapes: B rows, P padded prompt length, R padded response length, V vocabulary.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agentevolver.module.exp_manager.het_core_algos import (
    PolicyLossParams,
    agg_loss,
    count_tokens_and_seqs,
    entropy_from_logits,
    get_policy_loss_fn,
    kl_penalty,
)
from agentevolver.protocol import Batch, with_model_inputs
from agentevolver.utils.dist import all_reduce, world

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "responses")


def _tensors(batch: Batch, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    batch = with_model_inputs(batch)
    batch.require(*keys)
    return {k: batch.tensors[k] for k in keys}


def _pad_rows(tensors: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    """Append zero rows up to n_rows; each dummy row attends to one token so its logits stay finite,
    and its response_mask is 0 so it contributes nothing."""
    n = next(iter(tensors.values())).shape[0]
    if n >= n_rows:
        return tensors
    out = {}
    for k, v in tensors.items():
        pad = v.new_zeros((n_rows - n, *v.shape[1:]))
        if k == "attention_mask":
            pad[:, 0] = 1
        out[k] = torch.cat([v, pad])
    return out


def _forward(module: torch.nn.Module, mb: dict[str, torch.Tensor], temperature: float,
             calculate_entropy: bool, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(responses) and entropy at the R response positions: logits[:, P-1:P+R-1] / T in fp32."""
    resp = mb["responses"]  # (b, R)
    r = resp.shape[1]
    out = module(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                 position_ids=mb["position_ids"], use_cache=False, logits_to_keep=r + 1)
    logits = out.logits[:, :-1].float() / temperature  # (b, R, V)
    # log_softmax gathered without materialising the (b, R, V) log-prob tensor
    logp = logits.gather(-1, resp.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (b, R)
    entropy = None
    if calculate_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)  # (b, R)
    return logp, entropy


def _effective_temperature(temperature: float) -> float:
    """The rollout engines' convention: log_softmax(logits / T), T = 1 for greedy (T <= 0)."""
    return float(temperature) if temperature and temperature > 0 else 1.0


@torch.no_grad()
def compute_log_prob(module: torch.nn.Module, batch: Batch, temperature: float, micro_batch_size: int,
                     calculate_entropy: bool = False, *, device: str | torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response log-probs (B, R) (and entropies (B, R)) of this rank's rows, in fp32 on CPU.
    `device`: where the module computes (the worker's resolved trainer.device).

    A collective under FSDP2: every rank must call it; ranks run the same number of micro-batches.
    """
    if micro_batch_size < 1:
        raise ValueError(f"log-prob micro batch size must be >= 1, got {micro_batch_size}")
    t = _tensors(batch, _MODEL_KEYS)
    n = t["responses"].shape[0]
    n_micro = all_reduce(torch.tensor([math.ceil(n / micro_batch_size)]), op="max").item()
    temp, dev = _effective_temperature(temperature), torch.device(device)
    was_training = module.training
    module.eval()
    logps, ents = [], []
    for i in range(n_micro):
        mb = {k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in t.items()}
        mb = {k: v.to(dev) for k, v in _pad_rows(mb, 1).items()}  # an empty piece runs one dummy row
        logp, ent = _forward(module, mb, temp, calculate_entropy, entropy_grad=False)
        rows = min(micro_batch_size, max(n - i * micro_batch_size, 0))
        logps.append(logp[:rows].cpu())
        if ent is not None:
            ents.append(ent[:rows].cpu())
    module.train(was_training)
    log_probs = torch.cat(logps)
    return log_probs, (torch.cat(ents) if calculate_entropy else None)


def _ppo_keys(config: Any) -> tuple[str, ...]:
    keys = (*_MODEL_KEYS, "response_mask", "old_log_probs", "advantages")
    return keys + (("ref_log_prob",) if config.use_kl_loss else ())


def _sft_keys(config: Any) -> tuple[str, ...]:
    return (*_MODEL_KEYS, "response_mask")


def _grad_norm(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """clip_grad_norm_ over the (DTensor) params; the norm is the global one, identical on every rank."""
    params = [p for p in module.parameters() if p.grad is not None]
    limit = float(max_norm) if max_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach().float().cpu()


def update_policy(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch: Batch, config: Any,
                  temperature: float, loss: str = "ppo", *, device: str | torch.device) -> dict[str, float]:
    """One actor update on this rank's rows (a collective: every rank calls it with its share).

    config = actor_rollout_ref.actor. Mini-batches hold ppo_mini_batch_size rows over all ranks, cut into
    micro-batches of ppo_micro_batch_size_per_gpu rows. loss = "ppo" (DAPO policy loss + optional KL loss
    to ref_log_prob + optional entropy bonus) or "sft" (token-mean NLL over response_mask).
    A non-finite loss or grad norm skips that optimizer step on all ranks (actor/skipped_steps).
    `device`: where the module computes (the worker's resolved trainer.device).
    Returns metrics that are already global (identical on all ranks), averaged over mini-batches.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown actor loss {loss!r}; valid: {', '.join(LOSSES)}")
    actor_loss = LOSSES[loss]
    _, world_size = world()
    keys = actor_loss.keys(config) + tuple(k for k in ("exp_mask", "rollout_is_weights") if k in batch)
    t = _tensors(batch, keys)
    n_local = t["responses"].shape[0]
    n_global = int(all_reduce(torch.tensor([n_local])).item())
    if n_global == 0:
        raise ValueError("update_policy got an empty batch on every rank")
    mbs, mini = int(config.ppo_micro_batch_size_per_gpu), int(config.ppo_mini_batch_size)
    if mbs < 1 or mini < 1:
        raise ValueError(f"ppo_mini_batch_size ({mini}) and ppo_micro_batch_size_per_gpu ({mbs}) must be >= 1")
    n_mini = max(1, math.ceil(n_global / mini))
    # contiguous local pieces, one per mini-batch (sizes differ by at most one, as Batch.chunk)
    bounds = torch.linspace(0, n_local, n_mini + 1).round().long().tolist()
    pieces = [{k: v[a:b] for k, v in t.items()} for a, b in itertools.pairwise(bounds)]
    # two collectives for the whole update: rows per piece (max) and valid tokens / rows per piece (sum)
    rows_max = all_reduce(torch.tensor([b - a for a, b in itertools.pairwise(bounds)]), op="max").tolist()
    counts = all_reduce(torch.stack([torch.stack(count_tokens_and_seqs(p["response_mask"])) for p in pieces]))
    temp, dev = _effective_temperature(temperature), torch.device(device)
    entropy_coeff = float(config.entropy_coeff) if actor_loss.uses_entropy_bonus else 0.0
    module.train()
    history: list[dict[str, float]] = []
    for _epoch in range(int(config.ppo_epochs)):
        for piece, n_rows, (g_tokens, g_seqs) in zip(pieces, rows_max, counts):
            piece = _pad_rows(piece, max(n_rows, 1))
            # sums over micro-batches of: loss shares, clip metrics × tokens, entropy × mask, non-finite flag
            sums = torch.zeros(9, dtype=torch.float64)
            for i in range(0, piece["responses"].shape[0], mbs):
                mb = {k: v[i:i + mbs].to(dev) for k, v in piece.items()}
                mask = mb["response_mask"].float()
                logp, ent = _forward(module, mb, temp, calculate_entropy=True, entropy_grad=entropy_coeff != 0)
                total, parts = actor_loss.micro_loss(config, mb, mask, logp, ent, g_tokens, g_seqs, entropy_coeff)
                (total * world_size).backward()
                sums += torch.tensor(parts + [0.0 if torch.isfinite(total).item() else 1.0], dtype=torch.float64)
            all_reduce(sums)
            step = _step(module, optimizer, scheduler, config.grad_clip, sums)
            history.append(step | actor_loss.metrics(config, sums, max(float(g_tokens), 1.0)))
    return {k: sum(h[k] for h in history) / (1 if k == "actor/skipped_steps" else len(history)) for k in history[0]}


def _entropy_sum(ent: torch.Tensor | None, mask: torch.Tensor) -> float:
    return (ent.detach() * mask).sum().item() if ent is not None else 0.0


def _sft_micro_loss(config: Any, mb: dict[str, torch.Tensor], mask: torch.Tensor, logp: torch.Tensor,
                    ent: torch.Tensor, g_tokens: torch.Tensor, g_seqs: torch.Tensor, entropy_coeff: float
                    ) -> tuple[torch.Tensor, list[float]]:
    """Token-mean NLL over response_mask: this micro-batch's share, and the metric sums (see _ppo_micro_loss)."""
    total = agg_loss(-logp, mask, "token-mean", global_tokens=g_tokens)
    return total, [total.item(), 0.0, 0.0, 0.0, 0.0, _entropy_sum(ent, mask), 0.0, 0.0]


def _ppo_micro_loss(config: Any, mb: dict[str, torch.Tensor], mask: torch.Tensor, logp: torch.Tensor,
                    ent: torch.Tensor, g_tokens: torch.Tensor, g_seqs: torch.Tensor, entropy_coeff: float
                    ) -> tuple[torch.Tensor, list[float]]:
    """This micro-batch's share of the mini-batch loss, and its metric sums
    [main loss share, kl share, clipfrac·n, clipfrac_lower·n, ppo_kl·n, Σ entropy·mask, on share, off share]."""
    n_tok = mask.sum().item()
    ent_sum = _entropy_sum(ent, mask)
    mode, scale, pl = config.loss_agg_mode, config.loss_scale_factor, config.policy_loss
    params = PolicyLossParams(
        clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c,
        off_cliprange_high=config.off_cliprange_high, clip_cov_ratio=pl.clip_cov_ratio, clip_cov_lb=pl.clip_cov_lb,
        clip_cov_ub=pl.clip_cov_ub, kl_cov_ratio=pl.kl_cov_ratio, ppo_kl_coef=pl.ppo_kl_coef)
    weights = mb.get("rollout_is_weights")
    out = get_policy_loss_fn(pl.loss_mode)(
        mb["old_log_probs"].float(), logp, mb["advantages"].float(), mask, params, exp_mask=mb.get("exp_mask"),
        rollout_is_weights=None if weights is None else weights.float(), loss_agg_mode=mode,
        global_tokens=g_tokens, global_seqs=g_seqs, loss_scale_factor=scale)
    total, kl_share = out["pg_loss"], 0.0
    # shares of pg_loss from on- / off-policy (exp_mask) tokens, same denominators: they sum to it
    off = mask * mb["exp_mask"].float() if mb.get("exp_mask") is not None else torch.zeros_like(mask)
    with torch.no_grad():
        pg_off = agg_loss(out["pg_losses"].detach(), off, mode, g_tokens, g_seqs, scale).item()
        pg_on = agg_loss(out["pg_losses"].detach(), mask - off, mode, g_tokens, g_seqs, scale).item()
    if entropy_coeff != 0:
        total = total - entropy_coeff * agg_loss(ent, mask, mode, g_tokens, g_seqs, scale)
    if config.use_kl_loss:
        kl = agg_loss(kl_penalty(logp, mb["ref_log_prob"].float(), config.kl_loss_type), mask, mode,
                      g_tokens, g_seqs, scale)
        total = total + config.kl_loss_coef * kl
        kl_share = kl.item()
    return total, [out["pg_loss"].item(), kl_share, out["pg_clipfrac"].item() * n_tok,
                   out["pg_clipfrac_lower"].item() * n_tok, out["ppo_kl"].item() * n_tok, ent_sum, pg_on, pg_off]


def _step(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, grad_clip: float | None,
          sums: torch.Tensor) -> dict[str, float]:
    """Clip, then step — or skip on every rank when the loss or the (global) grad norm is not finite."""
    grad_norm = _grad_norm(module, grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    skipped = bool(sums[-1] > 0) or not bool(torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"actor/grad_norm": grad_norm.item(), "actor/lr": lr, "actor/skipped_steps": float(skipped)}


def _sft_metrics(config: Any, sums: torch.Tensor, tok: float) -> dict[str, float]:
    return {"actor/entropy": sums[5].item() / tok, "actor/sft_loss": sums[0].item()}


def _ppo_metrics(config: Any, sums: torch.Tensor, tok: float) -> dict[str, float]:
    out = {"actor/entropy": sums[5].item() / tok, "actor/pg_loss": sums[0].item(),
           "actor/pg_loss_on": sums[6].item(), "actor/pg_loss_off": sums[7].item(),
           "actor/pg_clipfrac": sums[2].item() / tok, "actor/pg_clipfrac_lower": sums[3].item() / tok,
           "actor/ppo_kl": sums[4].item() / tok}
    return out | ({"actor/kl_loss": sums[1].item()} if config.use_kl_loss else {})


@dataclass(frozen=True)
class ActorLoss:
    """One actor objective: the batch keys it reads, its per-micro-batch loss share and metric sums
    (micro_loss), and the metrics it reports from those sums (metrics; tok = the global valid tokens)."""

    keys: Callable[[Any], tuple[str, ...]]
    micro_loss: Callable[..., tuple[torch.Tensor, list[float]]]
    metrics: Callable[[Any, torch.Tensor, float], dict[str, float]]
    uses_entropy_bonus: bool  # reads actor.entropy_coeff


# update_policy(loss=...): "ppo" is the RL update, "sft" the warm start's NLL
LOSSES: dict[str, ActorLoss] = {
    "ppo": ActorLoss(_ppo_keys, _ppo_micro_loss, _ppo_metrics, uses_entropy_bonus=True),
    "sft": ActorLoss(_sft_keys, _sft_micro_loss, _sft_metrics, uses_entropy_bonus=False),
}
