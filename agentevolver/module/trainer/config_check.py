"""Up-front configuration validation (the seed's "validation check").

Runs once, before Ray or any worker starts. Every problem a user can cause is reported as ONE line
naming the key, the bad value and the valid values. Value checks run before filesystem/hardware
checks, so a bad value is reported as such even where the model or data is not there yet.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from agentevolver.alfworld.agent import ACTION_PROJECTIONS
from agentevolver.module.agent_flow.llm_policy import ROLLOUT_MODES
from agentevolver.module.exp_manager.het_core_algos import (
    ADV_ESTIMATORS,
    AGG_LOSS_MODES,
    DYNAMIC_SAMPLING_MODES,
    GIGPO_MODES,
    GROUP_ESTIMATORS,
    KL_PENALTIES,
    REWARD_SHAPING_MODES,
    STEP_ESTIMATORS,
)
from agentevolver.workers.fsdp_worker import LR_SCHEDULERS
from agentevolver.workers.rollout import ROLLOUT_ENGINES

LOGGERS = ("console", "file", "wandb")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A user-fixable configuration problem; its message is the one line shown to the user."""


def _fail(key: str, value, valid: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {valid}")


def _one_of(cfg: DictConfig, key: str, valid) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        _fail(key, value, "valid values are " + ", ".join(map(str, valid)))


def _number(cfg: DictConfig, key: str, *, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, integer: bool = False, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(key, value, f"must be {'an integer' if integer else 'a number'}")
    if minimum is not None and value < minimum:
        _fail(key, value, f"must be >= {minimum}")
    if above is not None and value <= above:
        _fail(key, value, f"must be > {above}")
    if maximum is not None and value > maximum:
        _fail(key, value, f"must be <= {maximum}")


def check_values(cfg: DictConfig) -> None:
    """Checks of the values alone (no filesystem, no hardware)."""
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    _one_of(cfg, "actor_rollout_ref.actor.loss_agg_mode", AGG_LOSS_MODES)
    for key in ("clip_ratio_low", "clip_ratio_high"):
        _number(cfg, f"actor_rollout_ref.actor.{key}", minimum=0)
    _number(cfg, "actor_rollout_ref.actor.off_cliprange_high", minimum=0, optional=True)
    _number(cfg, "actor_rollout_ref.actor.clip_ratio_c", above=1.0)
    _number(cfg, "actor_rollout_ref.actor.loss_scale_factor", above=0, optional=True)
    _one_of(cfg, "actor_rollout_ref.actor.kl_loss_type", KL_PENALTIES)
    _one_of(cfg, "algorithm.kl_penalty", KL_PENALTIES)
    _number(cfg, "actor_rollout_ref.actor.optim.lr", above=0)
    _one_of(cfg, "actor_rollout_ref.actor.optim.lr_scheduler_type", LR_SCHEDULERS)
    _number(cfg, "actor_rollout_ref.actor.optim.min_lr_ratio", minimum=0, maximum=1)
    _number(cfg, "actor_rollout_ref.actor.grad_clip", above=0)
    _one_of(cfg, "actor_rollout_ref.actor.fsdp_config.dtype", DTYPES)
    _one_of(cfg, "algorithm.adv_estimator", (*ADV_ESTIMATORS, *STEP_ESTIMATORS))
    if cfg.algorithm.adv_estimator in STEP_ESTIMATORS:
        if cfg.env.rollout_mode != "step":
            _fail("algorithm.adv_estimator", cfg.algorithm.adv_estimator,
                  "groups turns by their observation: needs env.rollout_mode=step")
        _one_of(cfg, "algorithm.gigpo.mode", GIGPO_MODES)
        _number(cfg, "algorithm.gigpo.step_advantage_w", minimum=0)
    _number(cfg, "algorithm.gamma", above=0, maximum=1)
    _one_of(cfg, "algorithm.dapo.dynamic_sampling.mode", DYNAMIC_SAMPLING_MODES)
    _number(cfg, "algorithm.dapo.dynamic_sampling.max_num_gen_batches", minimum=1, integer=True)
    _one_of(cfg, "algorithm.dapo.dynamic_sampling.metric", ("acc", "score"))
    _one_of(cfg, "algorithm.dapo.overlong_reward_shaping.mode", REWARD_SHAPING_MODES)
    _number(cfg, "algorithm.dapo.overlong_reward_shaping.buffer_length", minimum=0, integer=True)
    _one_of(cfg, "actor_rollout_ref.rollout.name", sorted(ROLLOUT_ENGINES))
    _number(cfg, "actor_rollout_ref.rollout.n", minimum=1, integer=True)
    _number(cfg, "actor_rollout_ref.rollout.temperature", minimum=0)
    _number(cfg, "actor_rollout_ref.rollout.response_length", minimum=1, integer=True)
    if cfg.algorithm.adv_estimator in GROUP_ESTIMATORS and rollout.n < 2:
        _fail("actor_rollout_ref.rollout.n", rollout.n,
              f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} compares rollouts within a group: "
              "needs n >= 2")
    for key in ("data.train_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_epochs",
                "data.max_prompt_length", "data.max_response_length", "env.max_steps",
                "trainer.nnodes", "trainer.n_gpus_per_node", "env.pool.num_workers"):
        _number(cfg, key, minimum=1, integer=True)
    rows = cfg.data.train_batch_size * rollout.n
    if cfg.env.rollout_mode == "trajectory" and rows % actor.ppo_mini_batch_size:  # step mode: rows vary
        _fail("actor_rollout_ref.actor.ppo_mini_batch_size", actor.ppo_mini_batch_size,
              f"data.train_batch_size × rollout.n = {rows} rows must divide by it "
              f"(valid: a divisor of {rows})")
    if actor.ppo_micro_batch_size_per_gpu > actor.ppo_mini_batch_size:
        _fail("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", actor.ppo_micro_batch_size_per_gpu,
              f"must be <= actor_rollout_ref.actor.ppo_mini_batch_size ({actor.ppo_mini_batch_size})")
    _one_of(cfg, "env.rollout_mode", ROLLOUT_MODES)
    if cfg.env.rollout_mode == "trajectory" and cfg.env.history_window is not None:
        _fail("env.history_window", cfg.env.history_window,
              "trajectory mode keeps the full history in one token sequence: use null")
    _number(cfg, "env.history_window", minimum=0, integer=True, optional=True)
    _one_of(cfg, "env.action_projection", ACTION_PROJECTIONS)
    if cfg.env.rollout_mode == "step" and cfg.algorithm.use_kl_in_reward:
        _fail("algorithm.use_kl_in_reward", True, "step mode has episode-level advantages: use "
              "actor_rollout_ref.actor.use_kl_loss=true for a KL term instead")
    _number(cfg, "sft.epochs", minimum=1, integer=True)
    _number(cfg, "sft.lr", above=0)
    _one_of(cfg, "sft.teacher", ("walkthrough", "explore"))
    _number(cfg, "sft.max_detours", minimum=0, integer=True)
    _number(cfg, "sft.samples_per_game", minimum=1, integer=True)
    _number(cfg, "sft.ppo_mini_batch_size", minimum=1, integer=True, optional=True)
    _one_of(cfg, "trainer.device", DEVICES)
    loggers = cfg.trainer.logger
    loggers = list(loggers) if isinstance(loggers, (list, ListConfig)) else [loggers]
    for name in loggers:
        if name not in LOGGERS:
            _fail("trainer.logger", name, "valid values are " + ", ".join(LOGGERS))
    for key in ("trainer.test_freq", "trainer.save_freq"):
        _number(cfg, key, integer=True)  # <= 0 disables
    _number(cfg, "trainer.total_training_steps", minimum=1, integer=True, optional=True)
    _number(cfg, "trainer.max_ckpt_to_keep", minimum=1, integer=True)
    mode = cfg.trainer.resume_mode
    if mode not in ("auto", "disable") and not isinstance(mode, str):
        _fail("trainer.resume_mode", mode, "valid values are auto, disable, or a checkpoint path")


def check_environment(cfg: DictConfig) -> None:
    """Checks against this machine: hardware, model folder, data folder, resume path."""
    import torch

    rollout = cfg.actor_rollout_ref.rollout
    device = cfg.trainer.device if cfg.trainer.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if rollout.name == "vllm" and not torch.cuda.is_available():
        _fail("actor_rollout_ref.rollout.name", "vllm",
              "vLLM needs CUDA and this machine has none: use actor_rollout_ref.rollout.name=hf")
    if device == "cuda":
        visible = torch.cuda.device_count()
        # Multi-node: each node must hold n_gpus_per_node; the driver node is checked here.
        if cfg.trainer.n_gpus_per_node > visible:
            valid = f"valid values are 1..{visible}" if visible else "use trainer.device=cpu"
            _fail("trainer.n_gpus_per_node", cfg.trainer.n_gpus_per_node,
                  f"only {visible} GPU(s) visible on this node: {valid}")
    model_path = Path(str(cfg.actor_rollout_ref.model.path))
    if not (model_path / "config.json").is_file():
        _fail("actor_rollout_ref.model.path", str(model_path),
              "no HF model folder (config.json) there; for the CPU default build one with "
              "`python -m agentevolver.models.build_tiny --out models/tiny-qwen2`")
    check_data(cfg)
    mode = cfg.trainer.resume_mode
    if mode not in ("auto", "disable") and not Path(mode).is_dir():
        _fail("trainer.resume_mode", mode, "valid values are auto, disable, or an existing checkpoint folder")


def check_data(cfg: DictConfig) -> None:
    from agentevolver.alfworld.data import list_games, resolve_data_dir

    data_dir = resolve_data_dir(cfg.env.alfworld.data_dir)
    splits = [cfg.env.alfworld.val_split] if cfg.trainer.val_only else [
        cfg.env.alfworld.train_split, cfg.env.alfworld.val_split]
    for split in splits:
        list_games(data_dir, split, cfg.env.alfworld.task_types)


def validate_config(cfg: DictConfig, check_env: bool = True) -> None:
    """Raise ConfigError (one line) for the first problem found; values first, then the machine."""
    if OmegaConf.is_missing(cfg.actor_rollout_ref.model, "path"):
        _fail("actor_rollout_ref.model.path", "???", "set it to a local HF model folder")
    check_values(cfg)
    if check_env:
        check_environment(cfg)
