"""Token log-probs and entropies from final hidden states, in chunks along the tokens.

The (N, V) fp32 logits of a micro-batch are never materialised, forward or backward: a custom autograd
Function keeps only the hidden states (N, H), the labels and logsumexp (N,), and recomputes each chunk's
logits in backward. Gradients are the exact (analytic) gradients of

    logp_n = z_n[y_n] - lse(z_n),   H_n = -Σ_v p_n,v · log p_n,v,   z_n = (h_n · Wᵀ) / T

    ∂logp_n/∂z_n = onehot(y_n) - p_n,   ∂H_n/∂z_n = -p_n ⊙ (log p_n + H_n),   p_n = softmax(z_n)

The chunk's matmul runs in the model's dtype and is cast to fp32 afterwards, exactly as the padded
path's `logits.float() / T` did; the chunk peak is ≈ 3 · chunk · V · 4 bytes.

`logprob_head` runs the computation INSIDE the HF root forward (it swaps the output embedding's
`forward` for the duration of the call): FSDP2 registers its all-gather / reduce-scatter hooks on the
root module's forward, and lm_head / the tied embedding live in the root's parameter group, so calling
`model.model(...)` and `lm_head` by hand would run on sharded DTensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _logits(h: torch.Tensor, w: torch.Tensor, inv_t: float) -> torch.Tensor:
    """fp32 chunk logits z = (h · Wᵀ) / T (the matmul in the model's dtype, as the padded path did)."""
    z = (h @ w.t()).float()
    return z if inv_t == 1.0 else z.mul_(inv_t)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row without a (c, V) temporary (a batched matmul)."""
    return (a.unsqueeze(1) @ b.unsqueeze(-1)).reshape(-1)


class _ChunkedLogProb(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), labels (N,)) -> (logp (N,), entropy (N,)) in fp32.
    Each (chunk, V) block is touched by as few full passes as possible (in-place exp / scale):
    on CPU and GPU alike the head is bandwidth-bound on these blocks, not on the matmuls."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_t: float,
                chunk: int, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_zeros(n, dtype=torch.float32)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            z = _logits(hidden[a:b], weight, inv_t)
            lse[a:b] = torch.logsumexp(z, dim=-1)
            logp[a:b] = z.gather(-1, labels[a:b, None]).squeeze(-1) - lse[a:b]  # before z changes in place
            if want_entropy:  # H = -Σ p·log p (not lse - Σ p·z: that cancels when H is small)
                logp_all = z.sub_(lse[a:b, None])
                ent[a:b] = -_rowdot(logp_all.exp(), logp_all)
            del z
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        ctx.set_materialize_grads(False)  # a detached / unused output sends None, not a zero tensor
        return logp, ent

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if g_logp is None and g_ent is None:
            return grad_h, grad_w, None, None, None, None
        inv_t = ctx.inv_t
        for a in range(0, hidden.shape[0], ctx.chunk):
            b = min(a + ctx.chunk, hidden.shape[0])
            h = hidden[a:b]
            z = _logits(h, weight, inv_t)
            if g_ent is not None:  # ∂H/∂z = -p ⊙ (log p + H): needs log p before it becomes p
                logp_all = z.sub_(lse[a:b, None])
                gz = (logp_all + ent[a:b, None]).mul_(-g_ent[a:b, None] * inv_t)
                p = logp_all.exp_()
                gz.mul_(p)
                if g_logp is not None:
                    gz.sub_(p * (g_logp[a:b, None] * inv_t))
            else:
                gz = z.sub_(lse[a:b, None]).exp_().mul_(-(g_logp[a:b, None] * inv_t))  # -g·p / T
            if g_logp is not None:  # + g·onehot(y) / T
                gz.scatter_add_(-1, labels[a:b, None], g_logp[a:b, None] * inv_t)
            gz = gz.to(hidden.dtype)
            if need_h:
                grad_h[a:b] = gz @ weight
            if need_w:
                grad_w.addmm_(gz.t(), h) if gz.dtype == torch.float32 else grad_w.add_((gz.t() @ h).float())
            del z, gz
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def chunked_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            temperature: float = 1.0, chunk_size: int = 1024, entropy: str = "none"
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(h·Wᵀ/T)[y] and (optionally) the entropy of softmax(h·Wᵀ/T), per token, fp32 (N,).

    entropy: "none" | "metric" (under no_grad, from the same chunks) | "grad" (differentiable).
    """
    if entropy not in ("none", "metric", "grad"):
        raise ValueError(f"entropy must be none | metric | grad, got {entropy!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, ent = _ChunkedLogProb.apply(hidden, weight, labels, 1.0 / temperature, int(chunk_size), entropy != "none")
    if entropy == "none":
        return logp, None
    return logp, (ent if entropy == "grad" else ent.detach())


@contextlib.contextmanager
def logprob_head(module: torch.nn.Module, labels: torch.Tensor, temperature: float, chunk_size: int,
                 entropy: str, keep: torch.Tensor) -> Iterator[dict[str, torch.Tensor | None]]:
    """While active, the model's output embedding maps the hidden states at `keep` (a (b, L) bool mask,
    N True; selected here rather than through `logits_to_keep`, whose bool form transformers < 5.20 lacks)
    to log-probs of `labels` (N,) instead of logits; the results land in the yielded dict ("logp", "entropy"), and the
    model's `logits` output is logp (N, 1) (with entropy as a second column when it carries a gradient,
    so FSDP2's pre-backward hooks see every differentiable output)."""
    head = module.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("logprob_head supports output embeddings without bias (Qwen2 / Llama lm_head)")
    out: dict[str, torch.Tensor | None] = {"logp": None, "entropy": None}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[keep]  # (b, L, H) -> (N, H)
        logp, ent = chunked_logprob_entropy(hidden, head.weight, labels, temperature, chunk_size, entropy)
        out["logp"], out["entropy"] = logp, ent
        return torch.stack([logp, ent], -1) if entropy == "grad" else logp[:, None]

    head.forward = forward  # instance attribute: shadows the class's Linear.forward for this call only
    try:
        yield out
    finally:
        del head.forward
