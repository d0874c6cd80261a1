"""Rollout engines behind one interface; `make_rollout_engine(config.name, ...)` picks one.

`hf` (transformers, CPU default) and `vllm` (GPU; vllm is imported only when the engine is built).
"""
from agentevolver.workers.rollout import hf_rollout, vllm_rollout  # noqa: F401  (register the engines)
from agentevolver.workers.rollout.base import (
    ROLLOUT_ENGINES,
    GenOutput,
    RolloutEngine,
    SamplingParams,
    make_rollout_engine,
    model_eos_token_ids,
)

__all__ = ["ROLLOUT_ENGINES", "GenOutput", "RolloutEngine", "SamplingParams", "make_rollout_engine",
           "model_eos_token_ids"]
