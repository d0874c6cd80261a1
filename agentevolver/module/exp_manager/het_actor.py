"""The actor: response-token log-probs and the DAPO / SFT update of an FSDP2-wrapped HF causal LM.

Split invariance (README, "How token-mean is exact"; tests/module/exp_manager/test_dist_token_mean.py): every
micro-batch's loss is aggregated with the GLOBAL valid-token / valid-row counts of its mini-batch
(summed over the rank's pieces and all-reduced once), and multiplied by world_size because FSDP
averages gradients over ranks. The accumulated gradient is then exactly the
gradient of the whole mini-batch loss, for any micro-batch size and any number of ranks.

FSDP2 all-gathers parameters in every forward, so all ranks must run the same number of forward /
backward calls: ranks holding fewer rows are padded with dummy rows whose loss mask is 0 (they add
exactly 0 to the loss and the gradient).

Memory (issue 15): each micro-batch is trimmed to its own longest prompt and response (or packed
padding-free into one sequence with restarting position_ids), micro-batches may be formed by a token
budget instead of a row count, and log π / entropy come from the final hidden states in chunks
(chunked_logprob.py): the (b, R, V) fp32 logits never exist, forward or backward.

Shapes: B rows, P padded prompt length, R padded response length, V vocabulary.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agentevolver.module.exp_manager.chunked_logprob import logprob_head
from agentevolver.module.exp_manager.het_core_algos import (
    agg_loss,
    count_tokens_and_seqs,
    kl_penalty,
    self_imitation_loss,
)
from agentevolver.module.exp_manager.policy_losses import PolicyLossParams, get_policy_loss_fn
from agentevolver.protocol import Batch, with_model_inputs
from agentevolver.utils.dist import all_reduce, world
from agentevolver.utils.seqlen_balancing import min_micro_batches, token_budget_micro_batches

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "responses")


@dataclass(frozen=True)
class Packing:
    """How a pass forms and runs its micro-batches (actor_rollout_ref.model.use_remove_padding,
    logprob_chunk_size; *.use_dynamic_bsz with its max_token_len_per_gpu)."""
    chunk_size: int = 1024             # tokens per lm_head chunk
    remove_padding: bool = False       # rows of a micro-batch packed into one sequence
    max_token_len: int | None = None   # token budget per micro-batch; None = fixed row counts

    @staticmethod
    def from_config(model_cfg: Any, dynamic_bsz: bool, max_token_len: int) -> Packing:
        return Packing(int(model_cfg.logprob_chunk_size), bool(model_cfg.use_remove_padding),
                       int(max_token_len) if dynamic_bsz else None)


def _tensors(batch: Batch, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    batch = with_model_inputs(batch)
    batch.require(*keys)
    return {k: batch.tensors[k] for k in keys}


def _pad_rows(tensors: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    """Append zero rows up to n_rows; each dummy row attends to one token (the last prompt column, so it
    survives trimming and packs as a 1-token sequence), and its response_mask is 0: it adds nothing."""
    n = next(iter(tensors.values())).shape[0]
    if n >= n_rows:
        return tensors
    p = tensors["attention_mask"].shape[1] - tensors["responses"].shape[1]
    out = {}
    for k, v in tensors.items():
        pad = v.new_zeros((n_rows - n, *v.shape[1:]))
        if k == "attention_mask":
            pad[:, p - 1] = 1
        out[k] = torch.cat([v, pad])
    return out


def _model_inputs(mb: dict[str, torch.Tensor], remove_padding: bool
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(model kwargs, keep, resp) for one micro-batch trimmed to its longest prompt P' and response R'.

    keep (bool, like input_ids): positions whose NEXT token is a real response token (what lm_head
    sees); resp (b, R'): those response tokens, in the same row-major order. remove_padding packs the
    real tokens of all rows into one (1, Σ len) sequence with restarting position_ids and no attention
    mask: flash_attention_2 turns that into varlen attention, and transformers' masking_utils
    (find_packed_sequence_indices) into a block-causal mask for sdpa / eager."""
    ids, am = mb["input_ids"], mb["attention_mask"].bool()
    r = mb["responses"].shape[1]
    p = ids.shape[1] - r
    n_prompt, resp = am[:, :p].sum(1), am[:, p:]
    n_resp = resp.sum(1)
    if bool(((n_prompt == 0) & (n_resp > 0)).any()):
        raise ValueError("a row has response tokens but no prompt token (nothing predicts its first token)")
    p2, r2 = max(int(n_prompt.max()), 1), int(n_resp.max())
    cols = slice(p - p2, p + r2)
    ids, am, pos, resp = ids[:, cols], am[:, cols], mb["position_ids"][:, cols], resp[:, :r2]
    keep = torch.zeros_like(am)
    keep[:, p2 - 1:p2 + r2 - 1] = resp
    if remove_padding:  # with_model_inputs' position_ids already restart at 0 on each row's first real token
        return {"input_ids": ids[am][None], "position_ids": pos[am][None]}, keep[am][None], resp
    return {"input_ids": ids, "attention_mask": am.long(), "position_ids": pos}, keep, resp


def _forward(module: torch.nn.Module, mb: dict[str, torch.Tensor], temperature: float, entropy: str,
             packing: Packing) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(responses) (b, R) and entropy (b, R) | None in fp32: log softmax(logits / T) at the
    response positions, 0 on padding. entropy: none | metric (no_grad) | grad (entropy_coeff != 0)."""
    r = mb["responses"].shape[1]
    inputs, keep, resp = _model_inputs(mb, packing.remove_padding)
    labels = mb["responses"][:, :resp.shape[1]][resp]
    with logprob_head(module, labels, temperature, packing.chunk_size, entropy, keep) as head:
        module(**inputs, use_cache=False, logits_to_keep=0)  # 0 = every position: the head selects `keep`

    def unflatten(x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(resp.shape).masked_scatter(resp, x)
        return torch.nn.functional.pad(full, (0, r - resp.shape[1]))

    return unflatten(head["logp"]), (None if head["entropy"] is None else unflatten(head["entropy"]))


def _micro_batches(t: dict[str, torch.Tensor], mbs: int, n_micro: int, packing: Packing
                   ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Exactly n_micro (row indices, micro-batch) pairs over these rows: token-budget partitions
    (packing.max_token_len) or consecutive runs of mbs rows; an empty one is a single dummy row."""
    n = t["responses"].shape[0]
    if packing.max_token_len is not None:
        parts = token_budget_micro_batches(_row_tokens(t), packing.max_token_len, n_micro)
    else:
        parts = [list(range(i * mbs, min((i + 1) * mbs, n))) for i in range(n_micro)]
    out = []
    for rows in parts:
        idx = torch.tensor(rows, dtype=torch.long)
        out.append((rows, _pad_rows({k: v[idx] for k, v in t.items()}, 1)))
    return out


def _row_tokens(t: dict[str, torch.Tensor]) -> list[int]:
    return t["attention_mask"].sum(1).tolist()


def _local_micro_count(t: dict[str, torch.Tensor], mbs: int, packing: Packing) -> int:
    """This rank's micro-batch count (the caller all-reduces the max)."""
    n = t["responses"].shape[0]
    if packing.max_token_len is not None:
        return min_micro_batches(_row_tokens(t), packing.max_token_len) if n else 1
    return max(math.ceil(n / mbs), 1)


def _effective_temperature(temperature: float) -> float:
    """The rollout engines' convention: log_softmax(logits / T), T = 1 for greedy (T <= 0)."""
    return float(temperature) if temperature and temperature > 0 else 1.0


@torch.no_grad()
def compute_log_prob(module: torch.nn.Module, batch: Batch, temperature: float, micro_batch_size: int,
                     calculate_entropy: bool = False, packing: Packing | None = None, *,
                     device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response log-probs (B, R) (and entropies (B, R)) of this rank's rows, in fp32 on CPU; 0 on padding.
    `device`: where the module computes (the worker's resolved trainer.device).

    A collective under FSDP2: every rank must call it; ranks run the same number of micro-batches.
    """
    packing = packing or Packing()
    if micro_batch_size < 1:
        raise ValueError(f"log-prob micro batch size must be >= 1, got {micro_batch_size}")
    t = _tensors(batch, _MODEL_KEYS)
    n, r = t["responses"].shape
    n_micro = int(all_reduce(torch.tensor([_local_micro_count(t, micro_batch_size, packing)]), op="max").item())
    temp, dev = _effective_temperature(temperature), torch.device(device)
    was_training = module.training
    module.eval()
    log_probs, ents = torch.zeros(n, r), (torch.zeros(n, r) if calculate_entropy else None)
    for rows, mb in _micro_batches(t, micro_batch_size, n_micro, packing):
        logp, ent = _forward(module, {k: v.to(dev) for k, v in mb.items()}, temp,
                             "metric" if calculate_entropy else "none", packing)
        idx = torch.tensor(rows, dtype=torch.long)
        log_probs[idx] = logp[:len(rows)].cpu()
        if ents is not None:
            ents[idx] = ent[:len(rows)].cpu()
    module.train(was_training)
    return log_probs, ents


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
                  temperature: float, loss: str = "ppo", packing: Packing | None = None, *,
                  device: str | torch.device) -> dict[str, float]:
    """One actor update on this rank's rows (a collective: every rank calls it with its share).

    config = actor_rollout_ref.actor. Mini-batches hold ppo_mini_batch_size rows over all ranks, cut into
    micro-batches of ppo_micro_batch_size_per_gpu rows, or (packing.max_token_len, use_dynamic_bsz) into
    token-balanced micro-batches of at most ppo_max_token_len_per_gpu tokens, as many on every rank.
    loss = "ppo" (DAPO policy loss + optional KL loss to ref_log_prob + optional entropy bonus) or "sft"
    (token-mean NLL over response_mask). Loss shares use the mini-batch's GLOBAL token / row counts, so
    the micro-batch split never changes the gradient. A non-finite loss or grad norm skips that
    optimizer step on all ranks (actor/skipped_steps).
    `device`: where the module computes (the worker's resolved trainer.device).
    Returns metrics that are already global (identical on all ranks), averaged over mini-batches.
    """
    packing = packing or Packing()
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
    # two collectives for the whole update: micro-batches per piece (max) and valid tokens / rows (sum)
    n_micro = all_reduce(torch.tensor([_local_micro_count(p, mbs, packing) for p in pieces]), op="max").tolist()
    counts = all_reduce(torch.stack([torch.stack(count_tokens_and_seqs(p["response_mask"])) for p in pieces]))
    temp, dev = _effective_temperature(temperature), torch.device(device)
    entropy_coeff = float(config.entropy_coeff) if actor_loss.uses_entropy_bonus else 0.0
    log_entropy = bool(config.get("calculate_entropy", True))
    entropy = "grad" if entropy_coeff != 0 else ("metric" if log_entropy else "none")
    module.train()
    history: list[dict[str, float]] = []
    for _epoch in range(int(config.ppo_epochs)):
        for piece, k, (g_tokens, g_seqs) in zip(pieces, n_micro, counts):
            # sums over micro-batches of: loss shares, clip metrics × tokens, entropy × mask, non-finite flag
            sums = torch.zeros(10, dtype=torch.float64)
            for _rows, mb in _micro_batches(piece, mbs, k, packing):
                mb = {key: v.to(dev) for key, v in mb.items()}
                mask = mb["response_mask"].float()
                logp, ent = _forward(module, mb, temp, entropy, packing)
                total, parts = actor_loss.micro_loss(config, mb, mask, logp, ent, g_tokens, g_seqs, entropy_coeff)
                (total * world_size).backward()
                sums += torch.tensor(parts + [0.0 if torch.isfinite(total).item() else 1.0], dtype=torch.float64)
            all_reduce(sums)
            step = _step(module, optimizer, scheduler, config.grad_clip, sums)
            history.append(step | actor_loss.metrics(config, sums, max(float(g_tokens), 1.0)))
    metrics = {k: sum(h[k] for h in history) / (1 if k == "actor/skipped_steps" else len(history))
               for k in history[0]}
    if entropy == "none":  # not computed: no metric rather than a 0
        del metrics["actor/entropy"]
    return metrics


def _entropy_sum(ent: torch.Tensor | None, mask: torch.Tensor) -> float:
    return (ent.detach() * mask).sum().item() if ent is not None else 0.0


def _sft_micro_loss(config: Any, mb: dict[str, torch.Tensor], mask: torch.Tensor, logp: torch.Tensor,
                    ent: torch.Tensor, g_tokens: torch.Tensor, g_seqs: torch.Tensor, entropy_coeff: float
                    ) -> tuple[torch.Tensor, list[float]]:
    """Token-mean NLL over response_mask: this micro-batch's share, and the metric sums (see _ppo_micro_loss)."""
    total = agg_loss(-logp, mask, "token-mean", global_tokens=g_tokens)
    return total, [total.item(), 0.0, 0.0, 0.0, 0.0, _entropy_sum(ent, mask), 0.0, 0.0, 0.0]


def _ppo_micro_loss(config: Any, mb: dict[str, torch.Tensor], mask: torch.Tensor, logp: torch.Tensor,
                    ent: torch.Tensor, g_tokens: torch.Tensor, g_seqs: torch.Tensor, entropy_coeff: float
                    ) -> tuple[torch.Tensor, list[float]]:
    """This micro-batch's share of the mini-batch loss, and its metric sums
    [main loss share, kl share, clipfrac·n, clipfrac_lower·n, ppo_kl·n, Σ entropy·mask, on share, off share,
    imitation share] (the main loss is pg_loss; imitation_coef · imitation share is added to the total)."""
    n_tok = mask.sum().item()
    ent_sum = _entropy_sum(ent, mask)
    mode, scale, pl = config.loss_agg_mode, config.loss_scale_factor, config.policy_loss
    params = PolicyLossParams.from_actor_config(config)
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
    imit_share = 0.0
    if config.imitation_coef and mb.get("exp_mask") is not None:  # self-imitation of off-policy successes
        imit = self_imitation_loss(logp, mb["advantages"].float(), mask, mb["exp_mask"], mode, g_tokens, g_seqs, scale)
        total = total + config.imitation_coef * imit
        imit_share = imit.item()
    return total, [out["pg_loss"].item(), kl_share, out["pg_clipfrac"].item() * n_tok,
                   out["pg_clipfrac_lower"].item() * n_tok, out["ppo_kl"].item() * n_tok, ent_sum, pg_on, pg_off,
                   imit_share]


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
    out |= {"actor/imitation_loss": sums[8].item()} if config.imitation_coef else {}
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
