"""The one batch contract that flows from rollout to actor.

A `Batch` is a dict of tensors that share the leading dimension B (one row per trajectory in
`trajectory` mode) plus per-row ids (numpy object/str/int arrays of length B). Rows are identified
by `traj_id`, never by list position: results computed elsewhere are joined back with `join`, which
matches rows by `traj_id`.

Tensor layout (P = padded prompt length, R = padded response length):
    prompts            (B, P)   left-padded initial prompt ids
    responses          (B, R)   right-padded ids after the prompt: model tokens AND env/observation
                                tokens of later turns (multi-turn trajectory as one sequence)
    prompt_attention_mask   (B, P)  1 on real prompt tokens (left padding = 0)
    response_attention_mask (B, R)  1 on real response tokens (right padding = 0)
    input_ids          (B, P+R) cat(prompts, responses)          } derived by `with_model_inputs`,
    attention_mask     (B, P+R) 1 on real tokens                  } after any concat, so batches of
    position_ids       (B, P+R) cumsum(attention_mask) - 1, >= 0  } different P/R stack correctly
    response_mask      (B, R)   1 only on model-generated tokens (the loss mask)
    rollout_log_probs  (B, R)   log-probs the rollout engine reported (0 off the mask)
    token_level_rewards(B, R)   the episode reward on the last model token
    old_log_probs / ref_log_prob / advantages  (B, R), added by later stages
    rollout_is_weights (B, R)   rollout-correction IS weights (0 off the mask), only when
                                algorithm.rollout_correction.rollout_is is set; RS / veto lower response_mask
Per-row ids: traj_id (unique), uid (GRPO group = task instance), task_id, task_type,
finish_reason, num_turns, policy_version, ...
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

LEFT_PADDED = ("prompts", "prompt_attention_mask")
DERIVED = ("input_ids", "attention_mask", "position_ids")


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # batch-level info (e.g. temperature), not per row

    def __post_init__(self) -> None:
        self.ids = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in self.ids.items()}
        sizes = {k: v.shape[0] for k, v in self.tensors.items()} | {k: len(v) for k, v in self.ids.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of rows: {sizes}")

    def __len__(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        for v in self.ids.values():
            return len(v)
        return 0

    def __getitem__(self, key: str):
        return self.tensors[key] if key in self.tensors else self.ids[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.ids

    def require(self, *keys: str) -> None:
        """Raise if a stage's input keys are missing (each stage declares what it needs once)."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"Batch is missing {missing}; has {sorted(self.tensors) + sorted(self.ids)}")

    def select(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> Batch:
        """Rows by index (an integer array or a boolean mask)."""
        idx = torch.as_tensor(np.ascontiguousarray(rows))  # torch refuses negative-stride views
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        np_idx = idx.numpy()
        return Batch({k: v[idx] for k, v in self.tensors.items()},
                     {k: v[np_idx] for k, v in self.ids.items()}, dict(self.meta))

    def chunk(self, num_chunks: int) -> list[Batch]:
        """Split into `num_chunks` contiguous pieces whose sizes differ by at most one."""
        bounds = np.linspace(0, len(self), num_chunks + 1).round().astype(int)
        return [self.select(np.arange(a, b)) for a, b in itertools.pairwise(bounds)]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Stack rows; tensors of different trailing length are right-padded with 0 (left for prompts)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        tensors = {}
        for k in [k for k in batches[0].tensors if k not in DERIVED]:
            parts = [b.tensors[k] for b in batches]
            tensors[k] = _pad_cat(parts, left=k in LEFT_PADDED)
        ids = {k: np.concatenate([b.ids[k] for b in batches]) for k in batches[0].ids}
        return Batch(tensors, ids, dict(batches[0].meta))

    def union(self, other: Batch) -> Batch:
        """Add `other`'s fields; rows are matched by traj_id. Conflicting keys are refused."""
        joined = other.align_to(self) if "traj_id" in other.ids else other
        clash = (set(self.tensors) & set(joined.tensors)) | ((set(self.ids) & set(joined.ids)) - {"traj_id"})
        if clash:
            raise ValueError(f"Batch.union: both batches define {sorted(clash)}")
        return Batch(self.tensors | joined.tensors,
                     self.ids | {k: v for k, v in joined.ids.items() if k != "traj_id"},
                     self.meta | joined.meta)

    def align_to(self, reference: Batch) -> Batch:
        """Reorder rows so that traj_id matches `reference`'s order exactly."""
        pos = {t: i for i, t in enumerate(self.ids["traj_id"].tolist())}
        try:
            order = [pos[t] for t in reference.ids["traj_id"].tolist()]
        except KeyError as e:
            raise ValueError(f"Batch.align_to: traj_id {e} not found") from None
        if len(order) != len(self):
            raise ValueError(f"Batch.align_to: {len(self)} rows cannot align to {len(reference)}")
        return self.select(order)


def _pad_cat(parts: list[torch.Tensor], left: bool) -> torch.Tensor:
    if parts[0].dim() < 2 or len({p.shape[1:] for p in parts}) == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        pad = width - p.shape[1]
        padded.append(torch.nn.functional.pad(p, (pad, 0) if left else (0, pad)))
    return torch.cat(padded)


def with_model_inputs(batch: Batch) -> Batch:
    """(Re)derive input_ids, attention_mask, position_ids from the prompt/response halves."""
    batch.require("prompts", "responses", "prompt_attention_mask", "response_attention_mask")
    t = dict(batch.tensors)
    t["input_ids"] = torch.cat([t["prompts"], t["responses"]], dim=1)
    t["attention_mask"] = torch.cat([t["prompt_attention_mask"], t["response_attention_mask"]], dim=1)
    t["position_ids"] = (t["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return Batch(t, batch.ids, batch.meta)
