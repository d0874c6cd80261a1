"""Plain helpers shared by the test modules (fixtures live in conftest.py): the repo root, the entry points
run as a user runs them, the tiny random Qwen2 and the synthetic batch of the actor tests."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from agentevolver.protocol import Batch

REPO = Path(__file__).resolve().parents[1]
BASE_YAML = REPO / "config" / "base.yaml"
VOCAB = 256


# ---------------------------------------------------------------- entry points, as a user runs them
def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an entry-point subprocess: wandb offline, one thread, no GPU."""
    return dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)


def main_ppo_cmd(overrides: list[str], config: str = "alfworld_dapo_tiny") -> list[str]:
    return [sys.executable, "-m", "agentevolver.main_ppo", "--config-name", config, *overrides]


def run_module(module: str, *args: str, timeout: float = 120, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repo root, output captured, never raising on its exit code."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or cli_env(), input=input,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_main_ppo(overrides: list[str], config: str = "alfworld_dapo_tiny", timeout: float = 120,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_module("agentevolver.main_ppo", "--config-name", config, *overrides, timeout=timeout, env=env)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a refused start (exit `code`, no traceback)."""
    err = proc.stderr.strip()
    print(err)
    assert proc.returncode == code and len(err.splitlines()) == 1, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    return err


def read_metrics(out: Path) -> dict[int, dict]:
    """Last row per step of <out>/metrics.jsonl (a resumed run re-logs the steps after its checkpoint)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def small_overrides(model: Path, data: Path, out: Path) -> list[str]:
    """A trainer run small enough for CI: 2 prompts × 4 rollouts, 24-token responses, 4 env steps."""
    # dynamic sampling off: a random-init model never wins, so every group would be dropped
    return [f"actor_rollout_ref.model.path={model}", f"env.alfworld.data_dir={data}",
            f"trainer.default_local_dir={out}", f"hydra.run.dir={out / 'hydra'}", "trainer.logger=[console,file]",
            "data.train_batch_size=2", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.response_length=24",
            "env.max_steps=4", "algorithm.dapo.dynamic_sampling.enable=false", "trainer.deterministic=true"]


# ---------------------------------------------------------------- the actor tests' model, config and batch
def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 (hidden 64, vocab 256, tied embeddings) saved as an HF folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def make_batch(n: int, seed: int = 0, p: int = 6, r: int = 8) -> Batch:
    """Left-padded prompts, right-padded responses of varied lengths, a partial loss mask, advantages."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, p + 1, (n,), generator=g)
    r_len = torch.randint(1, r + 1, (n,), generator=g)
    pam = (torch.arange(p)[None] >= (p - p_len)[:, None]).long()
    ram = (torch.arange(r)[None] < r_len[:, None]).long()
    prompts = torch.randint(3, VOCAB, (n, p), generator=g) * pam
    responses = torch.randint(3, VOCAB, (n, r), generator=g) * ram
    rmask = ram * (torch.rand(n, r, generator=g) < 0.8).long()
    rmask[0] = 0  # one row with no valid token (must not count as a sequence)
    adv = torch.randn(n, 1, generator=g).expand(n, r) * rmask
    old = (-3.0 - torch.rand(n, r, generator=g)) * rmask
    tensors = {"prompts": prompts, "responses": responses, "prompt_attention_mask": pam,
               "response_attention_mask": ram, "response_mask": rmask, "advantages": adv.contiguous(),
               "old_log_probs": old, "ref_log_prob": old - 0.1}
    return Batch(tensors, {"traj_id": np.array([f"t{i}" for i in range(n)]), "uid": np.arange(n) // 2})


def make_config(model_path: Path, **actor: object) -> object:
    """base.yaml for a CPU actor on `model_path` (a large lr, so updates show in fp32) + actor_rollout_ref overrides."""
    cfg = OmegaConf.load(REPO / "config" / "base.yaml")
    cfg.actor_rollout_ref.model.path = str(model_path)
    cfg.trainer.device = "cpu"
    cfg.env.alfworld.data_dir = None
    cfg.trainer.ray.address = None
    cfg.actor_rollout_ref.actor.optim.lr = 1e-2  # large, so that updates are visible in fp32
    cfg.actor_rollout_ref.actor.ppo_mini_batch_size = 1000
    for k, v in actor.items():
        OmegaConf.update(cfg, f"actor_rollout_ref.{k}", v)
    return cfg


# ---------------------------------------------------------------- loss-maths helpers
def lengths_mask(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) float64 mask with the first lengths[i] tokens of row i valid."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)


def random_partition(B: int, rng: random.Random) -> list[list[int]]:
    """A random split of rows 0..B-1 into 2..B non-empty shuffled micro-batches."""
    rows = list(range(B))
    rng.shuffle(rows)
    cuts = sorted(rng.sample(range(1, B), rng.randint(1, B - 1)))
    return [rows[a:b] for a, b in zip([0] + cuts, cuts + [B])]


def base_actor_config() -> object:
    """actor_rollout_ref.actor of config/base.yaml (the defaults the pure loss functions no longer carry)."""
    return OmegaConf.load(BASE_YAML).actor_rollout_ref.actor


def dapo_clip_kwargs() -> dict[str, float]:
    """base.yaml's clip ratios as dapo_compute_policy_loss keywords."""
    actor = base_actor_config()
    return {"cliprange_low": actor.clip_ratio_low, "cliprange_high": actor.clip_ratio_high,
            "clip_ratio_c": actor.clip_ratio_c}
