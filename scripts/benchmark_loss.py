"""Time dapo_compute_policy_loss (incl. agg_loss and metrics) against a minimal hand-written expression.

Prints one JSON object: median seconds over `--repeats` runs of forward-only and forward+backward for
both, on a (B, T) fp32 batch, and `ratio` = ours / minimal (forward+backward; `ratio_forward` too).
Usage: python scripts/benchmark_loss.py [--batch 64] [--length 8192] [--repeats 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from agentevolver.module.exp_manager.het_core_algos import dapo_compute_policy_loss


def minimal_loss(old: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 low: float = 0.2, high: float = 0.28, c: float = 3.0) -> torch.Tensor:
    """The same maths (token-mean, dual-clip, clip-higher) with no metrics and no checks."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high))
    pg = torch.where(adv < 0, torch.minimum(clipped, -adv * c), clipped)
    return (pg * mask).sum() / mask.sum()


def ours_loss(old: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dapo_compute_policy_loss(old, logp, adv, mask, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
                                    loss_agg_mode="token-mean")["pg_loss"]


def median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each fn; runs are interleaved so load from other processes hits all alike."""
    for fn in fns:
        fn()  # warm-up (allocator, first-call dispatch)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(acc) for acc in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, T = args.batch, args.length
    lengths = torch.randint(T // 8, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    old = -torch.rand(B, T, generator=gen) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=gen)).requires_grad_(True)
    adv = torch.randn(B, 1, generator=gen).expand(B, T).contiguous() * mask

    # numerics first: both must compute the same loss and gradient
    ref = minimal_loss(old, logp, adv, mask)
    (g_ref,) = torch.autograd.grad(ref, logp)
    got = ours_loss(old, logp, adv, mask)
    (g_got,) = torch.autograd.grad(got, logp)
    assert torch.allclose(ref, got, rtol=1e-5) and torch.allclose(g_ref, g_got, rtol=1e-5, atol=1e-12)

    def fwd(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(old, logp, adv, mask)
        return run

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(old, logp, adv, mask), logp)

    result = {"shape": [B, T], "dtype": "float32", "repeats": args.repeats, "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              # glibc returning/refaulting 2 MB buffers dominates the forward-only noise on CPU
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    for name, wrap in (("forward", fwd), ("forward_backward", fwd_bwd)):
        ours, minimal = median_times([wrap(ours_loss), wrap(minimal_loss)], args.repeats)
        result[f"{name}_ours_s"] = round(ours, 6)
        result[f"{name}_minimal_s"] = round(minimal, 6)
        result[f"ratio_{name}"] = round(ours / minimal, 3)
    result["ratio"] = result["ratio_forward_backward"]
    result["note"] = "ours = dapo_compute_policy_loss incl. agg_loss + clipfrac/clipfrac_lower/ppo_kl metrics"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
