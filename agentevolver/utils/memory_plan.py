"""Per-GPU memory plan of a training config: an analytic model, checked against measured peaks on CPU.

Why analytic and not FakeTensorMode + torch.distributed._tools.MemTracker: the plan must cover what a
fake-tensor trace of the actor cannot see (vLLM's gpu_memory_utilization share, the weight-sync
transient, the phases of one training step that never coexist), it must run in config_check in
milliseconds on a CPU box for a 3B model whose weights are not there, and every term is a closed
form a reader can check. tests/utils/test_memory_plan.py measures real peaks (MemTracker on CPU) for two
model shapes and requires the same formulas within ±25 %.

All sizes in bytes; N = ranks (FSDP2 shards over all of them); c = compute dtype bytes (bf16: 2).
  params     = 4·P/N (fp32 master shard) + c·(P_root + 2·P_layer) (root group unsharded through the
               step; a layer and its prefetched neighbour all-gathered)            [param_offload: the c·… part]
  grads      = 4·P/N (fp32 sharded) + c·(P_root + P_layer) (unsharded, before the reduce-scatter)
  optimizer  = 8·P/N (AdamW moments; on the GPU during the update even with optimizer_offload)
  reference  = c·P/N (+ c·(P_root + 2·P_layer) in its own pass)                    [0 without a reference]
  activations (T tokens in a micro-batch) = gradient checkpointing: L·T·H·c (layer inputs) + T·a·c (the
               layer being recomputed), else L·T·a·c;  a = 10·H + 4·I + 3·kv saved elements per token and
               layer (+ attention scores b·heads·S²·(4 + c) where attention is not flash / memory-efficient)
               A no-grad pass holds 4·H + 3·I elements per token of the running layer.
  logits     = chunk peak 4·chunk·V·4 (update backward) or 3·chunk·V·4 (log-prob) + T·H·c hidden kept
               With checkpointing the head's backward runs before any layer is recomputed, so the update
               holds the larger of (recomputed layer, head), not their sum; a no-grad pass holds one
               layer's activations or the head.
  vllm       = gpu_memory_utilization · gpu_memory while awake (rollout, weight sync)
  weight_sync= 4·P (the full fp32 state dict every rank gathers for its engine)
Phases (the plan's peak is the largest): rollout, weight_sync, log_prob, ref_log_prob, update.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024 ** 3
OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation (a flat allowance)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @staticmethod
    def from_hf_config(cfg: dict[str, Any]) -> ModelShape:
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return ModelShape(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"],
                          cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                          hd, bool(cfg.get("tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate \
            + 2 * self.hidden

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def act_per_token(self, grad: bool = True) -> int:
        """Elements per token of one decoder layer: saved for backward (grad), or alive at once in a
        no-grad forward (residual, normed input, attention output, MLP gate / up / product)."""
        if not grad:
            return 4 * self.hidden + 3 * self.intermediate
        return 10 * self.hidden + 4 * self.intermediate + 3 * self.kv_heads * self.head_dim


# shapes of models a recipe names but that need not be on this machine (config.json values)
KNOWN_SHAPES = {
    "Qwen2.5-3B": ModelShape(2048, 36, 11008, 151936, 16, 2, 128, True),
    "Qwen2.5-7B": ModelShape(3584, 28, 18944, 152064, 28, 4, 128, False),
    "Qwen2.5-1.5B": ModelShape(1536, 28, 8960, 151936, 12, 2, 128, True),
}


def model_shape(path: str) -> ModelShape:
    """From the HF folder's config.json, else from KNOWN_SHAPES by the folder name."""
    cfg_file = Path(path, "config.json")
    if cfg_file.is_file():
        return ModelShape.from_hf_config(json.loads(cfg_file.read_text()))
    for name, shape in KNOWN_SHAPES.items():
        if name.lower() in Path(path).name.lower():
            return shape
    raise ValueError(f"no config.json under {path!r} and no known shape for it ({', '.join(KNOWN_SHAPES)})")


def layer_activation_bytes(shape: ModelShape, tokens: int, c: int, attn_scores: int = 0, grad: bool = True) -> int:
    """One decoder layer's saved activations for `tokens` tokens (+ b·S² attention scores where the
    attention kernel is not flash / memory-efficient)."""
    return tokens * shape.act_per_token(grad) * c + attn_scores * shape.heads * (4 + c)


def activation_bytes(shape: ModelShape, tokens: int, c: int, checkpointing: bool, attn_scores: int = 0) -> int:
    """What the backward of one micro-batch holds besides the head: checkpointed layer inputs plus one
    recomputed layer, or every layer's activations without checkpointing."""
    layer = layer_activation_bytes(shape, tokens, c, attn_scores)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * c + layer
    return shape.layers * layer


def head_bytes(shape: ModelShape, tokens: int, chunk: int, c: int, grad: bool) -> int:
    """Chunked log-prob head: fp32 chunk logits and their temporaries, plus the hidden states it keeps."""
    return (4 if grad else 3) * min(chunk, max(tokens, 1)) * shape.vocab * 4 + tokens * shape.hidden * c


def plan(shape: ModelShape, *, world: int = 1, c: int = 2, fsdp: bool = True, update_tokens: int,
         logprob_tokens: int, ref_tokens: int, chunk: int, checkpointing: bool, param_offload: bool = False,
         optimizer_offload: bool = False, ref: bool = False, ref_offload: bool = False, vllm_share: float = 0.0,
         gpu_memory_gib: float = 80.0, free_cache_engine: bool = True, rollout: bool = True,
         attn_scores: int = 0, overhead_gib: float = OVERHEAD_GIB) -> dict[str, Any]:
    """The per-GPU plan (bytes -> GiB in the result): parts, phases and per_gpu_peak_gib."""
    p, n = shape.params, world
    unsharded = c * (shape.root_params + 2 * shape.layer_params) if fsdp else 0
    master = 0 if param_offload else 4 * p // n
    params = master + unsharded
    grads = (0 if param_offload else 4 * p // n) + (c * (shape.root_params + shape.layer_params) if fsdp else 0)
    optimizer = 0 if param_offload else 8 * p // n
    ref_resident = c * p // n if ref and not ref_offload else 0
    vllm = vllm_share * gpu_memory_gib * GIB if rollout else 0.0
    asleep = 0.0 if free_cache_engine else vllm
    overhead = overhead_gib * GIB
    idle = master + (0 if optimizer_offload else optimizer) + ref_resident + overhead
    ckpt = shape.layers * update_tokens * shape.hidden * c if checkpointing else 0
    act_update = activation_bytes(shape, update_tokens, c, checkpointing, attn_scores)
    head_update = head_bytes(shape, update_tokens, chunk, c, True)
    backward = ckpt + max(act_update - ckpt, head_update) if checkpointing else act_update + head_update

    def no_grad_pass(tokens: int) -> int:
        return max(layer_activation_bytes(shape, tokens, c, attn_scores, grad=False),
                   head_bytes(shape, tokens, chunk, c, False))

    lp, rp = no_grad_pass(logprob_tokens), no_grad_pass(ref_tokens)
    sync = 4 * p if rollout else 0
    phases = {
        "rollout": idle + vllm,
        "weight_sync": idle + vllm + sync,
        "log_prob": idle + unsharded + asleep + lp,
        "ref_log_prob": (idle + unsharded + asleep + rp) if ref else 0.0,
        "update": params + grads + optimizer + ref_resident + asleep + overhead + backward,
    }
    parts = {"params": params, "grads": grads, "optimizer": optimizer, "activations": act_update,
             "logits_chunk": head_update, "logprob_pass": max(lp, rp),
             "vllm": vllm, "weight_sync": sync, "reference": ref_resident, "overhead": overhead}
    peak_phase = max(phases, key=phases.get)
    return {"per_gpu_peak_gib": round(phases[peak_phase] / GIB, 2), "gpu_memory_gib": gpu_memory_gib,
            "fraction": round(phases[peak_phase] / GIB / gpu_memory_gib, 3), "peak_phase": peak_phase,
            "parts_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
            "phases_gib": {k: round(v / GIB, 3) for k, v in phases.items()},
            "params_b": round(p / 1e9, 3), "world": n, "phases_bytes": phases}


def _tokens(cfg: Any, dynamic: bool, budget: int, rows: int) -> int:
    """Tokens of the largest micro-batch: the budget, or rows × the longest possible row."""
    return int(budget) if dynamic else int(rows) * (int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length))


def plan_config(cfg: Any, gpu_memory_gib: float = 80.0, shape: ModelShape | None = None) -> dict[str, Any]:
    """The plan of a composed training config (CUDA, bf16 unless fsdp_config.dtype says fp32)."""
    arr = cfg.actor_rollout_ref
    shape = shape or model_shape(str(arr.model.path))
    c = 4 if arr.actor.fsdp_config.dtype == "fp32" else 2
    enable = arr.ref.enable
    ref = bool(arr.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward) if enable == "auto" else bool(enable)
    vllm = arr.rollout.name == "vllm"
    out = plan(
        shape, world=int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes), c=c,
        update_tokens=_tokens(cfg, arr.actor.use_dynamic_bsz, arr.actor.ppo_max_token_len_per_gpu,
                              arr.actor.ppo_micro_batch_size_per_gpu),
        logprob_tokens=_tokens(cfg, arr.rollout.log_prob_use_dynamic_bsz, arr.rollout.log_prob_max_token_len_per_gpu,
                               arr.rollout.log_prob_micro_batch_size_per_gpu),
        ref_tokens=_tokens(cfg, arr.ref.log_prob_use_dynamic_bsz, arr.ref.log_prob_max_token_len_per_gpu,
                           arr.ref.log_prob_micro_batch_size_per_gpu),
        chunk=int(arr.model.logprob_chunk_size), checkpointing=bool(arr.model.enable_gradient_checkpointing),
        param_offload=bool(arr.actor.fsdp_config.param_offload),
        optimizer_offload=bool(arr.actor.fsdp_config.optimizer_offload), ref=ref,
        ref_offload=bool(arr.ref.param_offload), vllm_share=float(arr.rollout.gpu_memory_utilization) if vllm else 0.0,
        gpu_memory_gib=gpu_memory_gib, free_cache_engine=bool(arr.rollout.free_cache_engine))
    return out


def over_budget_warning(cfg: Any, gpu_memory_gib: float) -> str | None:
    """One line when the plan exceeds the device memory, else None."""
    try:
        out = plan_config(cfg, gpu_memory_gib)
    except (ValueError, KeyError, OSError):
        return None  # no shape to plan with: the model-path check reports a missing folder
    if out["per_gpu_peak_gib"] <= gpu_memory_gib:
        return None
    return (f"memory plan: {out['per_gpu_peak_gib']} GiB per GPU at the {out['peak_phase']} phase exceeds "
            f"{gpu_memory_gib:g} GiB (scripts/plan_memory.py shows the parts; lower ppo_max_token_len_per_gpu "
            f"/ micro-batches / logprob_chunk_size / rollout.gpu_memory_utilization or enable offload)")
