"""GPU-path defects of issue 13 that a CPU can show: config checks vLLM would otherwise hit at the first
step, the per-rank engine seed / cache root, the RNG restore, the attention-kernel choice."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agentevolver.module.trainer.config_check import ConfigError, check_gpu_environment, validate_config
from agentevolver.utils.dist import preserve_rng_state, seed_everything
from agentevolver.workers.rollout.base import resolve_attn_implementation, rollout_max_model_len
from agentevolver.workers.rollout.vllm_rollout import vllm_cache_root
from tests.helpers import REPO


def recipe(name: str = "alfworld_dapo_3b", **overrides) -> OmegaConf:
    over = OmegaConf.load(REPO / "config" / f"{name}.yaml")
    over.pop("defaults")  # hydra's composition list, not a config key
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "config" / "base.yaml"), over)
    cfg.actor_rollout_ref.model.path = "unused"
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def model_dir(tmp_path: Path, max_position_embeddings: int) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": max_position_embeddings}))
    return tmp_path


VALUE_CASES = [
    ({"actor_rollout_ref.rollout.temperature": 2.5}, "actor_rollout_ref.rollout.temperature=2.5 is invalid: must be a number >= 0 and <= 2"),
    ({"actor_rollout_ref.rollout.temperature": 0.005},
     "actor_rollout_ref.rollout.temperature=0.005 is invalid: must be 0 (greedy) or in [0.01, 2]"),
    ({"actor_rollout_ref.rollout.val_kwargs.temperature": 3.0},
     "actor_rollout_ref.rollout.val_kwargs.temperature=3.0 is invalid: must be a number >= 0 and <= 2"),
    ({"actor_rollout_ref.rollout.temperature": 0.0},
     ("actor_rollout_ref.rollout.n=8 is invalid: greedy sampling (actor_rollout_ref.rollout.temperature=0) gives n "
     "identical samples")),
    ({"actor_rollout_ref.rollout.val_kwargs.n": 4},
     ("actor_rollout_ref.rollout.val_kwargs.n=4 is invalid: greedy sampling "
     "(actor_rollout_ref.rollout.val_kwargs.temperature=0) gives n identical samples")),
    ({"actor_rollout_ref.rollout.tensor_model_parallel_size": 2},
     "actor_rollout_ref.rollout.tensor_model_parallel_size=2 is invalid: must be 1: each rank's Ray actor owns one GPU"),
    ({"actor_rollout_ref.rollout.vllm_sync_mode": "rebuild"},
     "actor_rollout_ref.rollout.vllm_sync_mode='rebuild' is invalid: must be reload in the trainer"),
    ({"actor_rollout_ref.model.attn_implementation": "flash3"},
     ("actor_rollout_ref.model.attn_implementation='flash3' is invalid: must be one of auto, sdpa, eager, "
     "flash_attention_2")),
]


@pytest.mark.parametrize(("overrides", "message"), VALUE_CASES)
def test_gpu_value_checks(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(recipe(**overrides), check_env=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_recipes_pass_the_value_checks() -> None:
    for name in ("alfworld_dapo_3b", "alfworld_dapo_tiny"):
        validate_config(recipe(name), check_env=False)


def test_sequence_budget_against_max_position_embeddings(tmp_path: Path) -> None:
    """3B recipe, trajectory mode: 4096 + 16384 + 512 = 20992 tokens; Qwen2.5-3B has 32768 positions."""
    cfg = recipe()
    assert rollout_max_model_len(4096, 16384, 512, "trajectory") == 20992
    assert rollout_max_model_len(1024, 2048, 32, "step") == 1056
    check_gpu_environment(cfg, "cpu", model_dir(tmp_path, 32768))
    with pytest.raises(ConfigError) as err:
        check_gpu_environment(cfg, "cpu", model_dir(tmp_path, 16384))
    assert str(err.value) == (
        "data.max_response_length=16384 is invalid: data.max_prompt_length + max_response_length + "
        "rollout.response_length = 20992 exceeds the model's max_position_embeddings (16384) in "
        "env.rollout_mode=trajectory")
    step = recipe("alfworld_dapo_tiny", **{"data.max_prompt_length": 1000})
    with pytest.raises(ConfigError, match=r"^data.max_prompt_length=1000 is invalid: data.max_prompt_length \+ "
                       r"rollout.response_length = 1032 exceeds the model's max_position_embeddings \(1024\)"):
        check_gpu_environment(step, "cpu", model_dir(tmp_path, 1024))


def test_flash_attention_without_flash_attn_is_a_config_error(tmp_path: Path) -> None:
    cfg = recipe(**{"actor_rollout_ref.model.attn_implementation": "flash_attention_2"})
    with pytest.raises(ConfigError) as err:
        check_gpu_environment(cfg, "cpu", model_dir(tmp_path, 32768))
    assert str(err.value) == ("actor_rollout_ref.model.attn_implementation='flash_attention_2' is invalid: "
                              "needs CUDA and the flash-attn package (README: GPU setup): use auto or sdpa")


def test_attn_implementation_resolution() -> None:
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="flash_attention_2 needs CUDA"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(ValueError, match="must be one of auto, sdpa, eager, flash_attention_2"):
        resolve_attn_implementation("flash", "cpu")


def test_vllm_cache_root_per_rank() -> None:
    assert vllm_cache_root({"VLLM_CACHE_ROOT": "/c/vllm"}, 3) == "/c/vllm/rank3"
    assert vllm_cache_root({"VLLM_CACHE_ROOT": "/c/vllm/rank3"}, 3) == "/c/vllm/rank3"  # a rebuilt engine
    assert vllm_cache_root({"XDG_CACHE_HOME": "/x"}, 0) == "/x/vllm/rank0"  # vLLM's own default root + rank
    roots = {vllm_cache_root({}, r) for r in range(4)}
    assert len(roots) == 4


def test_preserve_rng_state_undoes_a_reseed() -> None:
    """vLLM's worker init calls set_random_seed(seed) on this process; the trainer's streams must go on
    as if it never happened."""
    seed_everything(11)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(11)
    with preserve_rng_state():
        seed_everything(0)  # what vLLM does
        random.random(), np.random.rand(), torch.rand(1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_train_script_defaults_to_python3() -> None:
    script = (REPO / "scripts" / "train_alfworld_dapo_3b.sh").read_text()
    assert "PY=${PYTHON:-python3}" in script


def test_gpu_extra_installs_without_torch_at_build_time() -> None:
    """flash-attn's setup.py imports torch, so it cannot sit in an extra that pip builds in isolation."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("flash-attn") for dep in extras["gpu"])
    docker = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG FLASH_ATTN_VERSION=2.8.3.post2" in docker and "--no-build-isolation" in docker
