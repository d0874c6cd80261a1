"""Data-parallel ranks × micro-batches reproduce the whole-batch gradient (real 2-process gloo group).

Each rank takes an uneven share of the rows, cuts it into micro-batches, aggregates every micro-batch
with the GLOBAL token / sequence counts (summed over its micro-batches, all-reduced once over ranks),
multiplies by world_size and back-propagates; gradients are then averaged over ranks as FSDP/DDP do.
The result must equal a single process's full-batch gradient. The seed source's per-micro-batch
normalisation is shown to be off. Every policy-loss mode is checked the same way (clip_cov / kl_cov with
the whole batch's token selection handed to each piece: see het_core_algos.compute_policy_loss_clip_cov).
"""
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agentevolver.module.exp_manager.het_core_algos import (
    AGG_LOSS_MODES,
    count_tokens_and_seqs,
    dapo_compute_policy_loss,
)
from agentevolver.module.exp_manager.policy_losses import (
    POLICY_LOSS_MODES,
    PolicyLossParams,
    clip_cov_select,
    get_policy_loss_fn,
    kl_cov_select,
)
from agentevolver.utils.seqlen_balancing import min_micro_batches, token_budget_micro_batches
from tests.helpers import base_actor_config, dapo_clip_kwargs

WORLD = 2
VOCAB, HIDDEN, B, T = 13, 8, 7, 10
RANK_ROWS = {0: [[0], [1, 2, 3]], 1: [[4], [5], [6]]}  # uneven ranks, micro-batches of size 1 included
RANK_SHARD = {0: [0, 1, 2, 3], 1: [4, 5, 6]}
TOKEN_BUDGETS = (1, 6, 12, 17, 1000)  # below the longest row (rows run alone) .. everything in one


class TinyPolicy(torch.nn.Module):
    """Next-token log-probs from the previous token: embedding -> linear -> log_softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T + 1) -> (B, T)
        logits = self.head(torch.tanh(self.emb(tokens[:, :-1])))
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def make_setup():
    """Identical model and batch on every process (same seeds)."""
    torch.manual_seed(0)
    model = TinyPolicy().double()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=gen)
    lengths = torch.tensor([2, 10, 0, 5, 9, 1, 7])  # very different lengths, one empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    with torch.no_grad():
        old = model(tokens) + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # some tokens clip
    adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T) * mask
    return model, tokens, old, adv, mask


CLIP = dapo_clip_kwargs()
PARAMS = replace(PolicyLossParams.from_actor_config(base_actor_config()), clip_cov_ratio=0.2, clip_cov_lb=-1.0,
                 clip_cov_ub=5.0, kl_cov_ratio=0.2)


def whole_batch_selection(loss_mode: str) -> dict[str, torch.Tensor]:
    """clip_cov / kl_cov: the token choice made once over the whole batch (then sliced per piece)."""
    model, tokens, old, adv, mask = make_setup()
    with torch.no_grad():
        logp = model(tokens)
    if loss_mode == "kl_cov":
        return {"cov_mask": kl_cov_select(adv, logp, mask, PARAMS.kl_cov_ratio)}
    if loss_mode == "clip_cov":
        ratio = torch.exp(logp - old)
        clipped = -adv * ratio.clamp(0.8, 1.28) > -adv * ratio
        return {"cov_mask": clip_cov_select(adv, logp, mask, clipped, PARAMS.clip_cov_ratio, PARAMS.clip_cov_lb,
                                            PARAMS.clip_cov_ub, torch.Generator().manual_seed(0))}
    return {}


def mode_grads(loss_mode: str, mode: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-batch gradient, data-parallel gradient) of one policy-loss mode with one aggregation."""
    fn, sel = get_policy_loss_fn(loss_mode), whole_batch_selection(loss_mode)
    model, tokens, old, adv, mask = make_setup()
    fn(old, model(tokens), adv, mask, PARAMS, loss_agg_mode=mode, **sel)["pg_loss"].backward()
    full = flat_grad(model)
    model, tokens, old, adv, mask = make_setup()
    micro = RANK_ROWS[rank]
    counts = torch.zeros(2, dtype=torch.int64)
    for rows in micro:
        counts += torch.stack(count_tokens_and_seqs(mask[rows]))
    dist.all_reduce(counts)
    for rows in micro:
        loss = fn(old[rows], model(tokens[rows]), adv[rows], mask[rows], PARAMS, loss_agg_mode=mode,
                  global_tokens=counts[0], global_seqs=counts[1], **{k: v[rows] for k, v in sel.items()})["pg_loss"]
        (loss * WORLD).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    return full, flat_grad(model)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def full_batch_grad(mode: str) -> torch.Tensor:
    model, tokens, old, adv, mask = make_setup()
    dapo_compute_policy_loss(old, model(tokens), adv, mask, loss_agg_mode=mode, **CLIP)["pg_loss"].backward()
    return flat_grad(model)


def budget_micro_batches(rank: int, budget: int, mask: torch.Tensor) -> list[list[int]]:
    """The actor's use_dynamic_bsz split: token-budget partitions of this rank's rows, as many on every
    rank (max over ranks, one all-reduce); an empty partition is simply skipped here (no FSDP)."""
    rows = RANK_SHARD[rank]
    lengths = mask[rows].sum(-1).long().tolist()
    k = torch.tensor([min_micro_batches(lengths, budget)])
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    return [[rows[i] for i in part] for part in token_budget_micro_batches(lengths, budget, int(k))]


def data_parallel_grad(mode: str, rank: int, naive: bool, micro: list[list[int]] | None = None) -> torch.Tensor:
    model, tokens, old, adv, mask = make_setup()
    micro = [m for m in (micro or RANK_ROWS[rank]) if m]
    counts = torch.zeros(2, dtype=torch.int64)
    for rows in micro:
        counts += torch.stack(count_tokens_and_seqs(mask[rows]))
    dist.all_reduce(counts)  # one all-reduce: global tokens and sequences of the mini-batch
    for rows in micro:
        args = (old[rows], model(tokens[rows]), adv[rows], mask[rows])
        if naive:  # the seed source: normalise per micro-batch, average over micro-batches
            loss = dapo_compute_policy_loss(*args, loss_agg_mode=mode, **CLIP)["pg_loss"] / len(micro)
        else:  # share of the global loss; x world because the gradient all-reduce averages
            loss = dapo_compute_policy_loss(*args, loss_agg_mode=mode, **CLIP, global_tokens=counts[0],
                                            global_seqs=counts[1])["pg_loss"] * WORLD
        loss.backward()
    for p in model.parameters():  # what FSDP / DDP do: average gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    return flat_grad(model)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for mode in AGG_LOSS_MODES:
            ref = full_batch_grad(mode)
            result[mode] = ((data_parallel_grad(mode, rank, naive=False) - ref).abs().max().item(),
                            ref.abs().max().item())
            for budget in TOKEN_BUDGETS:
                micro = budget_micro_batches(rank, budget, make_setup()[-1])
                result[(mode, budget)] = ((data_parallel_grad(mode, rank, False, micro) - ref).abs().max().item(),
                                          ref.abs().max().item())
        for loss_mode in POLICY_LOSS_MODES:
            for mode in AGG_LOSS_MODES:
                full, dp = mode_grads(loss_mode, mode, rank)
                result[f"{loss_mode}/{mode}"] = ((dp - full).abs().max().item(), full.abs().max().item())
        ref = full_batch_grad("token-mean")
        naive = data_parallel_grad("token-mean", rank, naive=True)
        result["naive_rel_err"] = ((naive - ref).norm() / ref.norm()).item()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_dp_micro_batches_reproduce_full_batch_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only: the test box has no network
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key in [*AGG_LOSS_MODES, *((m, b) for m in AGG_LOSS_MODES for b in TOKEN_BUDGETS),
                    *(f"{lm}/{m}" for lm in POLICY_LOSS_MODES for m in AGG_LOSS_MODES)]:
            err, scale = result[key]
            assert scale > 1e-3, key  # a real, non-vanishing gradient
            assert err < 1e-6, (key, err)
        # per-micro-batch normalisation is not the batch token-mean: far off, not rounding
        assert result["naive_rel_err"] > 0.1, result["naive_rel_err"]
