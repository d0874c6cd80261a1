"""Chunked log-probs, trimmed / packed micro-batches and token-budget partitions (single process, CPU).

The reference everywhere is today's padded path: the full (b, R, V) logits, log_softmax, autograd.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agentevolver.module.exp_manager import het_actor
from agentevolver.module.exp_manager.chunked_logprob import chunked_logprob_entropy
from agentevolver.protocol import with_model_inputs
from agentevolver.utils.seqlen_balancing import (
    balanced_rank_shards,
    lpt_partition,
    min_micro_batches,
    token_budget_micro_batches,
)
from tests.helpers import make_batch, make_tiny_model


def naive(h, w, y, t):
    z = (h @ w.t()).float() / t
    logp = z.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprob_entropy_values_and_exact_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    n, hdim, v, t = 13, 8, 50, 0.7
    h0 = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w0 = torch.randn(v, hdim, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    grads = []
    for fn in ("naive", "chunked"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fn == "naive":
            logp, ent = naive(h, w, y, t)
        else:
            logp, ent = chunked_logprob_entropy(h, w, y, t, chunk, entropy="grad")
        ((logp.double() * a).sum() + (ent.double() * b).sum()).backward()
        grads.append((logp.detach(), ent.detach(), h.grad, w.grad))
    for x, z in zip(*grads):
        assert torch.allclose(x.double(), z.double(), atol=1e-5, rtol=1e-5), ((x - z).abs().max(), x.abs().max())
    # metric entropy carries no gradient; "none" returns no entropy
    h = h0.clone().requires_grad_()
    _, ent = chunked_logprob_entropy(h, w0, y, t, chunk, entropy="metric")
    assert not ent.requires_grad
    assert chunked_logprob_entropy(h, w0, y, t, chunk)[1] is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM


    path = make_tiny_model(tmp_path_factory.mktemp("tiny_pack"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _tensors(n, seed):
    batch = with_model_inputs(make_batch(n, seed=seed, p=7, r=11))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "responses")}


def _padded_reference(model, mb, temperature):
    """Today's path: full logits[:, P-1:P+R-1] / T over the whole padded batch."""
    r = mb["responses"].shape[1]
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                position_ids=mb["position_ids"], use_cache=False, logits_to_keep=r + 1)
    z = out.logits[:, :-1].float() / temperature
    logp = z.log_softmax(-1).gather(-1, mb["responses"][..., None]).squeeze(-1)
    return logp, -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


@pytest.mark.parametrize("remove_padding", [False, True])
def test_trimmed_and_packed_forward_match_the_padded_path(tiny, remove_padding):
    mb = _tensors(5, seed=3)
    ram = mb["attention_mask"][:, -mb["responses"].shape[1]:].bool()
    packing = het_actor.Packing(chunk_size=3, remove_padding=remove_padding)
    grads = []
    for path in ("padded", "new"):
        tiny.zero_grad()
        if path == "padded":
            logp, ent = _padded_reference(tiny, mb, 0.7)
        else:
            logp, ent = het_actor._forward(tiny, mb, 0.7, "grad", packing)
        ((logp * ram).sum() + 0.3 * (ent * ram).sum()).backward()
        grads.append((logp.detach() * ram, ent.detach() * ram,
                      torch.cat([p.grad.flatten() for p in tiny.parameters()])))
    (lp0, e0, g0), (lp1, e1, g1) = grads
    print(f"remove_padding={remove_padding}: max|Δlogp| {(lp0 - lp1).abs().max():.3g}, "
          f"grad rel {((g0 - g1).norm() / g0.norm()):.3g}")
    assert (lp0 - lp1).abs().max() < 1e-5
    assert (e0 - e1).abs().max() < 1e-5
    assert ((g0 - g1).norm() / g0.norm()) < 1e-5


def test_compute_log_prob_token_budget_and_packing_match_fixed_micro_batches(tiny):
    batch = make_batch(9, seed=5, p=7, r=11)
    ram = batch["response_attention_mask"].bool()
    ref, ref_ent = het_actor.compute_log_prob(tiny, batch, 1.0, micro_batch_size=9, calculate_entropy=True,
                                              device="cpu")
    for packing in (het_actor.Packing(chunk_size=4, max_token_len=20),
                    het_actor.Packing(chunk_size=7, remove_padding=True, max_token_len=25),
                    het_actor.Packing(chunk_size=1024, remove_padding=True)):
        got, ent = het_actor.compute_log_prob(tiny, batch, 1.0, micro_batch_size=2, calculate_entropy=True,
                                              packing=packing, device="cpu")
        assert ((got - ref) * ram).abs().max() < 1e-5, packing
        assert ((ent - ref_ent) * ram).abs().max() < 1e-5
        assert (got[~ram] == 0).all()


def test_partitions_respect_the_budget_and_balance():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 2000, size=37).tolist()
    for budget in (1999, 2500, 4000, 10**6):
        k = min_micro_batches(lengths, budget)
        parts = token_budget_micro_batches(lengths, budget)
        assert len(parts) == k and sorted(i for p in parts for i in p) == list(range(37))
        assert all(sum(lengths[i] for i in p) <= budget or len(p) == 1 for p in parts)
        assert k >= -(-sum(lengths) // budget)
    # a larger count (another rank needs more) still covers every row, some parts may be empty
    parts = lpt_partition([5, 3], 4)
    assert sorted(map(len, parts)) == [0, 0, 1, 1]
    assert min_micro_batches([], 10) == 1
    shards = balanced_rank_shards(lengths, 4)
    assert sorted(map(len, shards)) == [9, 9, 9, 10]
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)
