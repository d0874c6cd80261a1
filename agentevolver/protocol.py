"""The one batch contract that flows from rollout to actor.

A `Batch` is a dict of tensors that share the leading dimension B (one row per trajectory in
`trajectory` mode, one per turn in `step` mode) plus per-row ids (numpy arrays of length B) and
batch-level `meta`. Rows are identified by `traj_id`, never by list position: results computed
elsewhere are joined back with `union`, which matches rows by `traj_id`.

A rollout row is declared once, below: ROLLOUT_TENSORS (P = padded prompt length, R = padded
response length), EPISODE_IDS (per episode, from the trainer: who played what and how it ended) and
ROW_IDS (per row, from the policy). `rollout_batch` is the only way rollout rows are built, and it
refuses anything else. Later stages add (B, R) tensors: old_log_probs, ref_log_prob, advantages
(and `with_model_inputs` derives input_ids / attention_mask / position_ids, (B, P+R)); each stage
states what it reads with `Batch.require`.
With algorithm.rollout_correction.rollout_is set, the trainer adds rollout_is_weights (B, R) (0 off the
mask); its RS / veto lower response_mask.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    width: str    # "P" (prompt side) or "R" (response side)
    padding: str  # "left" | "right": where Batch.concat pads a shorter row
    doc: str


ROLLOUT_TENSORS: dict[str, TensorSpec] = {
    "prompts": TensorSpec(torch.long, "P", "left", "left-padded initial prompt ids"),
    "prompt_attention_mask": TensorSpec(torch.long, "P", "left", "1 on real prompt tokens"),
    "responses": TensorSpec(torch.long, "R", "right", "ids after the prompt: model tokens AND env/observation "
                            "tokens of later turns (trajectory mode)"),
    "response_attention_mask": TensorSpec(torch.long, "R", "right", "1 on real response tokens"),
    "response_mask": TensorSpec(torch.float32, "R", "right", "1 only on model-generated tokens (the loss mask)"),
    "rollout_log_probs": TensorSpec(torch.float32, "R", "right", "log-probs the engine reported (0 off the mask)"),
    "token_level_rewards": TensorSpec(torch.float32, "R", "right", "the row's reward on its last model token"),
    "exp_mask": TensorSpec(torch.float32, "R", "right", "1 on model tokens sampled under an experience-guided "
                           "prompt but trained under the stripped one, or replayed (off-policy; HET loss)"),
}
# numpy dtype kind of each id: U = str, b = bool, i = int, f = float
EPISODE_IDS: dict[str, str] = {
    "traj_id": "U",            # unique per row (step mode: "<episode>/t<turn>")
    "uid": "U",                # the GRPO group = one task instance played n times
    "task_id": "U", "task_type": "U",
    "finish_reason": "U",      # success, max_steps, context_limit, prompt_too_long, env_error, ...
    "won": "b", "steps": "i", "format_errors": "i", "invalid_actions": "i", "projected_actions": "i",
    "exp_replayed": "b",       # a stored success replayed into this group (exp_manager.replay), or an expert
                               # relabelling of a failed episode (exp_manager.dagger): not played by the policy
}
ROW_IDS: dict[str, str] = {
    "episode_id": "U", "turn": "i", "is_last": "b",  # exactly one is_last row per episode
    "anchor": "U",             # step mode: the observation the turn answered (GiGPO's state)
    "num_turns": "i", "policy_version": "i",  # the episode's turns; oldest weights version that acted
    "score": "f",              # the episode's (shaped) reward
    "exp_guided": "b",         # the episode's prompts carried retrieved experiences (exp_manager)
}
ROLLOUT_IDS: dict[str, str] = EPISODE_IDS | ROW_IDS
LEFT_PADDED = tuple(k for k, spec in ROLLOUT_TENSORS.items() if spec.padding == "left")
DERIVED = ("input_ids", "attention_mask", "position_ids")


def rollout_batch(tensors: Mapping[str, torch.Tensor], ids: Mapping[str, Sequence], temperature: float) -> Batch:
    """Rollout rows, checked against the declared schema: exactly its keys, dtypes and widths."""
    if set(tensors) != set(ROLLOUT_TENSORS) or set(ids) != set(ROLLOUT_IDS):
        raise ValueError(f"rollout rows must have exactly tensors {sorted(ROLLOUT_TENSORS)} and ids "
                         f"{sorted(ROLLOUT_IDS)}; missing {sorted((set(ROLLOUT_TENSORS) - set(tensors)) | (set(ROLLOUT_IDS) - set(ids)))}, "
                         f"extra {sorted((set(tensors) - set(ROLLOUT_TENSORS)) | (set(ids) - set(ROLLOUT_IDS)))}")
    widths: dict[str, int] = {}
    for k, spec in ROLLOUT_TENSORS.items():
        t = tensors[k]
        if t.dtype != spec.dtype or t.dim() != 2:
            raise ValueError(f"rollout tensor {k}: want 2-d {spec.dtype}, got {t.dim()}-d {t.dtype}")
        if widths.setdefault(spec.width, t.shape[1]) != t.shape[1]:
            raise ValueError(f"rollout tensor {k} is {t.shape[1]} wide, other {spec.width}-side tensors "
                             f"{widths[spec.width]}")
    arrays = {k: np.asarray(v) for k, v in ids.items()}
    for k, kind in ROLLOUT_IDS.items():
        if len(arrays[k]) and arrays[k].dtype.kind != kind:
            raise ValueError(f"rollout id {k}: want numpy kind {kind!r}, got {arrays[k].dtype}")
    batch = Batch(dict(tensors), arrays, {"temperature": float(temperature)})
    if len(set(arrays["traj_id"].tolist())) != len(batch):
        raise ValueError("rollout rows need unique traj_id")
    return batch


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

    def keys(self) -> tuple[frozenset[str], frozenset[str]]:
        """(tensor keys other than the derived model inputs, id keys): what concat compares."""
        return frozenset(self.tensors) - frozenset(DERIVED), frozenset(self.ids)

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Stack rows; tensors of different trailing length are right-padded with 0 (left for prompts).
        Batches with different keys or conflicting meta are refused (a key-less Batch() is skipped);
        derived model inputs are dropped (`with_model_inputs` re-derives them at the new widths)."""
        batches = [b for b in batches if b.tensors or b.ids or b.meta]
        if not batches:
            return Batch()
        for b in batches[1:]:
            if b.keys() != batches[0].keys():
                (t0, i0), (t1, i1) = batches[0].keys(), b.keys()
                raise ValueError(f"Batch.concat: batches differ in keys: {sorted((t0 ^ t1) | (i0 ^ i1))}")
        meta = _merge_meta([b.meta for b in batches], "Batch.concat")
        tensors = {}
        for k in sorted(batches[0].keys()[0], key=list(batches[0].tensors).index):
            parts = [b.tensors[k] for b in batches]
            tensors[k] = _pad_cat(parts, left=k in LEFT_PADDED)
        ids = {k: np.concatenate([b.ids[k] for b in batches]) for k in batches[0].ids}
        return Batch(tensors, ids, meta)

    def union(self, other: Batch) -> Batch:
        """Add `other`'s fields; rows are matched by traj_id. Keys both define, and meta values that
        disagree, are refused."""
        joined = other.align_to(self) if "traj_id" in other.ids else other
        clash = (set(self.tensors) & set(joined.tensors)) | ((set(self.ids) & set(joined.ids)) - {"traj_id"})
        if clash:
            raise ValueError(f"Batch.union: both batches define {sorted(clash)}")
        return Batch(self.tensors | joined.tensors,
                     self.ids | {k: v for k, v in joined.ids.items() if k != "traj_id"},
                     _merge_meta([self.meta, joined.meta], "Batch.union"))

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


def _merge_meta(metas: Sequence[dict], where: str) -> dict:
    """The union of batch-level meta; one key with two different values is refused."""
    out: dict = {}
    for m in metas:
        for k, v in m.items():
            if k in out and out[k] != v:
                raise ValueError(f"{where}: meta {k!r} conflicts: {out[k]!r} vs {v!r}")
            out[k] = v
    return out


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
