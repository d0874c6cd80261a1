"""Token-budget micro-batches and token-balanced rank shards (verl's use_dynamic_bsz, balance_batch).

Pure functions over row token lengths; the collective part (same micro-batch count on every rank) is
the caller's single all-reduce of `min_micro_batches`.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def lpt_partition(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Longest-processing-time greedy: rows by decreasing length, each into the lightest of k parts.
    Returns k lists of row indices (ascending; some may be empty when k > len(lengths)).
    Max load <= sum/k + max(lengths), and within 4/3 of the optimum."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    heap = [(0, j) for j in range(k)]
    parts: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, j = heapq.heappop(heap)
        parts[j].append(i)
        heapq.heappush(heap, (load + int(lengths[i]), j))
    return [sorted(p) for p in parts]


def _fits(parts: list[list[int]], lengths: Sequence[int], max_tokens: int) -> bool:
    """Every part within the budget, or a single row (a row longer than the budget runs alone)."""
    return all(len(p) <= 1 or sum(lengths[i] for i in p) <= max_tokens for p in parts)


def min_micro_batches(lengths: Sequence[int], max_tokens: int) -> int:
    """Smallest k >= ceil(Σ lengths / max_tokens) whose LPT partition fits the token budget (>= 1)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    k = max(1, math.ceil(sum(int(x) for x in lengths) / max_tokens))
    while not _fits(lpt_partition(lengths, k), lengths, max_tokens):
        k += 1
    return k


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int, k: int | None = None) -> list[list[int]]:
    """Row indices of each micro-batch: k balanced parts (k = min_micro_batches when None; callers pass
    the max over ranks so that every rank runs the same number of forward/backward calls)."""
    return lpt_partition(lengths, min_micro_batches(lengths, max_tokens) if k is None else k)


def balanced_rank_shards(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Rows for each rank: sizes differ by at most one (as Batch.chunk) and token loads are balanced
    (LPT restricted to ranks that still have room). Indices ascending within a shard."""
    n = len(lengths)
    cap = [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]
    heap = [(0, r) for r in range(world_size)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        full = []
        load, r = heapq.heappop(heap)
        while len(shards[r]) >= cap[r]:
            full.append((load, r))
            load, r = heapq.heappop(heap)
        shards[r].append(i)
        heapq.heappush(heap, (load + int(lengths[i]), r))
        for item in full:
            heapq.heappush(heap, item)
    return [sorted(s) for s in shards]
