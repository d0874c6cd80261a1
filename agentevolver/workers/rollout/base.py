"""The rollout-engine contract: token ids in -> token ids + per-token log-probs + finish reason out.

One engine per rank, colocated with the FSDP actor in the same process (hybrid engine).

Log-prob convention (the FSDP actor computes the SAME quantity for old/new log-probs):
    log_prob[t] = log_softmax(logits[t] / T)[token[t]],  T = temperature if temperature > 0 else 1
with NO top-p / top-k filtering applied to the reported value (filtering only shapes sampling).
Generation stops on any eos id of the model (generation_config + config + tokenizer eos) or a
`stop_token_ids` id; the stop token IS part of `token_ids` (the policy must learn to emit it), and
nothing after it is (`trim_at_stop`, applied by every engine). The eos a model folder declares need
not be the token that closes a chat turn (a Qwen base model's eos is <|endoftext|>, its chat template
closes turns with <|im_end|>): the policy adds the template's end-of-turn id to stop_token_ids.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0              # nucleus sampling mass (1 = off)
    top_k: int = -1                 # keep the k most likely tokens (-1 = off)
    max_tokens: int = 256           # new tokens per response
    n: int = 1                      # responses per prompt
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos ids
    seed: int | None = None         # per-call seed for reproducible sampling (None = global RNG)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"invalid SamplingParams: {self}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    @property
    def logprob_temperature(self) -> float:
        """T of the log-prob convention: the sampling temperature, or 1 for greedy."""
        return self.temperature if self.temperature > 0 else 1.0

    @classmethod
    def from_rollout_config(cls, config: Any, validate: bool = False, **overrides: Any) -> SamplingParams:
        """From the `actor_rollout_ref.rollout` node; validate=True applies its `val_kwargs`."""
        kw = {"temperature": float(config.temperature), "top_p": float(config.top_p), "top_k": int(config.top_k),
              "max_tokens": int(config.response_length), "n": int(config.n)}
        if validate:
            kw.update({k: v for k, v in dict(config.val_kwargs).items() if k in kw})
        kw.update(overrides)
        return cls(**kw)


@dataclass
class GenOutput:
    token_ids: list[int]            # generated ids, the stop token included when finish_reason == "stop"
    log_probs: list[float]          # one per token id, per the convention above
    finish_reason: str              # "stop" | "length"
    policy_version: int             # weights version that produced it (engine.policy_version)


def trim_at_stop(token_ids: list[int], log_probs: list[float], stop_ids: list[int] | set[int]
                 ) -> tuple[list[int], list[float], str]:
    """(ids, log-probs, finish_reason) cut just after the first stop id: "stop" when one is there, else
    "length". Ids past the stop (padding of a finished row, tokens an engine ran on) are never returned."""
    stops = set(stop_ids)
    n = min(len(token_ids), len(log_probs))
    for i in range(n):
        if token_ids[i] in stops:
            return list(token_ids[:i + 1]), list(log_probs[:i + 1]), "stop"
    return list(token_ids[:n]), list(log_probs[:n]), "length"


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # actor_rollout_ref.model.attn_implementation
WAKE_TAGS = ("weights", "kv_cache")  # what wake_up(tags) restores; None = everything


def flash_attn_available() -> bool:
    """Whether the flash-attn package imports (transformers' flash_attention_2 needs it)."""
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):  # absent, or a wheel built for another torch/CUDA (undefined symbol)
        return False
    return True


def resolve_attn_implementation(name: str, device: str) -> str:
    """auto -> flash_attention_2 on CUDA when flash-attn imports, else sdpa; explicit names pass through.

    flash_attention_2 without a GPU or without flash-attn is a user error (config_check reports it
    as one line before anything starts; this raises the same for direct callers)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "auto":
        return "flash_attention_2" if device == "cuda" and flash_attn_available() else "sdpa"
    if name == "flash_attention_2" and (device != "cuda" or not flash_attn_available()):
        raise ValueError("attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
                         "(README: GPU setup); use auto or sdpa")
    return name


def rollout_max_model_len(max_prompt_length: int, max_response_length: int, response_length: int,
                          rollout_mode: str) -> int:
    """Longest sequence (prompt + generated) the rollout engine is asked to hold.

    trajectory: the engine's prompt is the whole episode so far, < max_prompt_length + max_response_length
    tokens, and one turn adds up to response_length:  P + R_max + r.
    step: one turn's prompt (<= max_prompt_length) plus one turn's response:  P + r.
    """
    if rollout_mode == "trajectory":
        return int(max_prompt_length) + int(max_response_length) + int(response_length)
    return int(max_prompt_length) + int(response_length)


class RolloutEngine(ABC):
    """Generation backend. `config` is the `actor_rollout_ref.rollout` omegaconf node.

    seed: the engine's base seed (trainer.seed + rank, so ranks sample differently); rank: this
    process's rank (per-rank caches); max_model_len: longest sequence (rollout_max_model_len; None =
    the model's own limit); attn_implementation: transformers' attention kernel (engines on HF
    modeling code)."""

    def __init__(self, model_path: str, config: Any, device: str, dtype: torch.dtype, *, seed: int = 0,
                 rank: int = 0, max_model_len: int | None = None, attn_implementation: str = "sdpa") -> None:
        self.model_path = str(model_path)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed, self.rank, self.max_model_len = int(seed), int(rank), max_model_len
        self.attn_implementation = attn_implementation
        self.policy_version = 0
        self.eos_token_ids = model_eos_token_ids(self.model_path)

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenOutput]]:
        """For each prompt (a list of token ids), params.n outputs."""

    @property
    def streams_weights(self) -> bool:
        """True: load_weights takes an iterator of (name, tensor) and consumes it once, so the sync
        never holds a second full copy of the weights. False: it gets a dict."""
        return False

    @abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights with the actor's full HF-named state dict (an iterator of (name, tensor)
        pairs when streams_weights); set policy_version."""

    def sleep(self) -> None:
        """Free accelerator memory before the actor update (weights may be dropped)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what sleep() freed: tags=None everything, or a subset of WAKE_TAGS. The weight sync
        wakes ["weights"], loads, then wakes ["kv_cache"], so the KV cache is not resident while the
        new weights are handed over (a lower peak)."""

    def stop_ids(self, params: SamplingParams) -> list[int]:
        return sorted(set(self.eos_token_ids) | set(params.stop_token_ids))


def model_eos_token_ids(model_path: str) -> list[int]:
    """All eos ids a model folder declares (generation_config.json, config.json, tokenizer eos)."""
    ids: set[int] = set()
    folder = Path(model_path)
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
    except (OSError, ValueError):  # a folder without tokenizer files: config ids only
        pass
    if not ids:
        raise ValueError(f"{model_path}: no eos_token_id in generation_config.json / config.json / tokenizer")
    return sorted(ids)


ROLLOUT_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_rollout_engine(name: str) -> Callable:
    def deco(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        ROLLOUT_ENGINES[name] = factory
        return factory
    return deco


def make_rollout_engine(name: str, model_path: str, config: Any, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, **options: Any) -> RolloutEngine:
    """Create the engine registered under `name` (actor_rollout_ref.rollout.name); `options` are the
    keyword arguments of RolloutEngine.__init__ (seed, rank, max_model_len, attn_implementation)."""
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid names: {sorted(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[name](model_path, config, device, dtype, **options)
