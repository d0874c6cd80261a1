"""The ONE declaration of what every config key may hold: `SCHEMA` (key -> check) and `RULES`.

    SCHEMA["trainer.test_freq"] = Int(min=1, off=0)      # one line per key of config/base.yaml
    SCHEMA["x.engine_kwargs"] = Dict(Num())               # a free-form mapping is one key too
    RULES = (mini_batch_divides_rows, ...)                # checks that relate several keys

Adding a key = its line (default + comment) in config/base.yaml and its line here; tests/module/trainer/test_config_schema.py
fails while either is missing. Valid-name sets are not listed here: each `OneOf` reads the registry or
tuple of the module that owns the choice (a registry filled at import is read when the check runs).
A failed check is ONE line: `<key>=<value> is invalid: must be <what is valid>` (`ConfigError`).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from agentevolver.alfworld.agent import ACTION_PROJECTIONS, SYSTEM_PROMPT_STYLES
from agentevolver.alfworld.data import TASK_TYPES
from agentevolver.module.agent_flow.llm_policy import ROLLOUT_MODES
from agentevolver.module.exp_manager.advantages import ADV_ESTIMATORS, GIGPO_MODES
from agentevolver.module.exp_manager.experience import (
    EXPERIENCE_FIELD,
    ROLLOUT_EXPMODES,
    SAMPLE_EXPMODES,
    SUMMARIZERS,
)
from agentevolver.module.exp_manager.het_core_algos import (
    AGG_LOSS_MODES,
    DYNAMIC_SAMPLING_METRICS,
    DYNAMIC_SAMPLING_MODES,
    KL_PENALTIES,
    REWARD_SHAPING_MODES,
)
from agentevolver.module.exp_manager.policy_losses import POLICY_LOSS_MODES
from agentevolver.module.exp_manager.replay import REPLAY_MATCH
from agentevolver.module.exp_manager.rollout_corr import ROLLOUT_IS_LEVELS, ROLLOUT_RS_LEVELS
from agentevolver.module.trainer.checkpoint_manager import RESUME_MODES
from agentevolver.module.trainer.task_source import CURRICULA, TASK_SOURCES
from agentevolver.module.trainer.tracking import LOGGERS
from agentevolver.sft import TEACHERS
from agentevolver.utils.dist import DEVICES, DTYPE_CHOICES
from agentevolver.workers.fsdp_worker import LR_SCHEDULERS, REF_ENABLE
from agentevolver.workers.rollout import ROLLOUT_ENGINES
from agentevolver.workers.rollout.base import ATTN_IMPLEMENTATIONS
from agentevolver.workers.rollout.vllm_rollout import VLLM_SYNC_MODES


class ConfigError(ValueError):
    """A user-fixable configuration problem; its message is the one line shown to the user."""


def fail(key: str, value: Any, valid: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {valid}")


def show(value: Any) -> str:
    """A value as the user writes it in YAML / on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- checks
class Check:
    """`ok(value)` and `what`: what is valid, in words ('must be <what>')."""

    what: str = ""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Num(Check):
    """A number (int or float, never a bool) within the given bounds; `off` is one extra accepted value."""

    min: float | None = None
    max: float | None = None
    above: float | None = None   # strict lower bound
    below: float | None = None   # strict upper bound
    off: float | None = None     # a sentinel that means "off" (e.g. top_k=-1)
    integer = False

    def ok(self, value: Any) -> bool:
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        if self.off is not None and value == self.off:
            return True
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    @property
    def what(self) -> str:
        bounds = [f"{op} {show(b)}" for op, b in ((">=", self.min), (">", self.above), ("<=", self.max),
                                                  ("<", self.below)) if b is not None]
        text = ("an integer" if self.integer else "a number") + (" " + " and ".join(bounds) if bounds else "")
        return text + (f", or {show(self.off)} (off)" if self.off is not None else "")


@dataclass(frozen=True)
class Int(Num):
    integer = True


@dataclass(frozen=True)
class Bool(Check):
    what = "true or false"

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Str(Check):
    """A non-empty string; `hint` says what it names."""

    hint: str = ""

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value != ""

    @property
    def what(self) -> str:
        return "a non-empty string" + (f" ({self.hint})" if self.hint else "")


@dataclass(frozen=True)
class OneOf(Check):
    """One of the owner's names (a tuple, or a registry dict read when the check runs). Types are strict:
    `true` is not `1`, the string 'true' is not `true`."""

    choices: Collection[Any]

    def ok(self, value: Any) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices)

    @property
    def what(self) -> str:
        return "one of " + ", ".join(show(c) for c in self.choices)


@dataclass(frozen=True)
class Optional(Check):
    """null (meaning `null_means`) or a value `inner` accepts."""

    inner: Check
    null_means: str = ""

    def ok(self, value: Any) -> bool:
        return value is None or self.inner.ok(value)

    @property
    def what(self) -> str:
        return f"{self.inner.what}, or null" + (f" ({self.null_means})" if self.null_means else "")


@dataclass(frozen=True)
class ListOf(Check):
    """A list whose items `item` accepts; `length` fixes its size; `single` also accepts one bare item."""

    item: Check
    length: int | None = None
    single: bool = False

    def ok(self, value: Any) -> bool:
        if self.single and self.item.ok(value):
            return True
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        return (self.length is None or len(value) == self.length) and all(self.item.ok(v) for v in value)

    @property
    def what(self) -> str:
        size = f"{self.length} " if self.length is not None else ""
        return f"a list of {size}items, each {self.item.what}"


@dataclass(frozen=True)
class Dict(Check):
    """A free-form mapping (e.g. extra kwargs passed through): str keys, each value `value` accepts.
    Its own keys are not schema keys: the walk stops at it."""

    value: Check | None = None

    def ok(self, value: Any) -> bool:
        if not isinstance(value, (dict, DictConfig)):
            return False
        return all(isinstance(k, str) and (self.value is None or self.value.ok(v)) for k, v in value.items())

    @property
    def what(self) -> str:
        return "a mapping" + (f" whose values are each {self.value.what}" if self.value else "")


@dataclass(frozen=True)
class AnyOf(Check):
    options: tuple[Check, ...]

    def ok(self, value: Any) -> bool:
        return any(o.ok(value) for o in self.options)

    @property
    def what(self) -> str:
        return " or ".join(o.what for o in self.options)


# ----------------------------------------------------------------------------- the schema
POS_INT = Int(min=1)
FRACTION = Num(min=0, max=1)
TEMPERATURE = Num(min=0, max=2)  # 0 = greedy; above 2 sampling is close to uniform noise
TOP_P = Num(above=0, max=1)
FREQ = Int(min=1, off=0)  # every N steps (and at the last step); 0 = off (one value only: -1, -2 are refused)

SCHEMA: dict[str, Check] = {
    "data.train_batch_size": POS_INT,
    "data.val_batch_size": Optional(POS_INT, "the whole eval split at once"),
    "data.max_prompt_length": POS_INT,
    "data.max_response_length": POS_INT,
    "data.shuffle": Bool(),
    "data.seed": Int(min=0),
    "data.max_broken_game_frac": Num(min=0, max=1),
    "data.task_source": OneOf(TASK_SOURCES),
    "data.task_gen.seed": Optional(Int(min=0), "derived from data.seed"),
    "data.task_gen.split": Str("a folder name for the generated games"),
    "data.task_gen.prefetch": POS_INT,
    "data.task_gen.max_games": Optional(POS_INT, "every game fresh"),
    "data.task_gen.receptacles": ListOf(ListOf(Int(min=3, max=25), length=2)),
    "data.task_gen.distractors": ListOf(ListOf(Int(min=0, max=40), length=2)),
    "data.task_gen.closed_fraction": ListOf(FRACTION),
    "data.task_gen.curriculum": OneOf(CURRICULA),
    "data.task_gen.curriculum_window": POS_INT,
    "data.task_gen.curriculum_min_weight": Num(above=0, max=1),
    "actor_rollout_ref.model.path": Str("a local HF model folder"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": Bool(),
    "actor_rollout_ref.model.trust_remote_code": Bool(),
    "actor_rollout_ref.model.attn_implementation": OneOf(ATTN_IMPLEMENTATIONS),
    "actor_rollout_ref.model.use_remove_padding": Bool(),
    "actor_rollout_ref.model.logprob_chunk_size": POS_INT,
    "actor_rollout_ref.actor.ppo_mini_batch_size": POS_INT,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": POS_INT,
    "actor_rollout_ref.actor.use_dynamic_bsz": Bool(),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": POS_INT,
    "actor_rollout_ref.actor.calculate_entropy": Bool(),
    "actor_rollout_ref.actor.ppo_epochs": POS_INT,
    "actor_rollout_ref.actor.loss_agg_mode": OneOf(AGG_LOSS_MODES),
    "actor_rollout_ref.actor.loss_scale_factor": Optional(Num(above=0), "the padded response length"),
    "actor_rollout_ref.actor.clip_ratio_low": Num(min=0),
    "actor_rollout_ref.actor.clip_ratio_high": Num(min=0),
    "actor_rollout_ref.actor.clip_ratio_c": Num(above=1),
    "actor_rollout_ref.actor.off_cliprange_high": Optional(Num(min=0), "clip_ratio_high"),
    "actor_rollout_ref.actor.imitation_coef": Num(min=0),
    "actor_rollout_ref.actor.policy_loss.loss_mode": OneOf(POLICY_LOSS_MODES),
    "actor_rollout_ref.actor.policy_loss.clip_cov_ratio": Num(above=0, max=1),
    "actor_rollout_ref.actor.policy_loss.clip_cov_lb": Num(),
    "actor_rollout_ref.actor.policy_loss.clip_cov_ub": Num(),
    "actor_rollout_ref.actor.policy_loss.kl_cov_ratio": Num(above=0, max=1),
    "actor_rollout_ref.actor.policy_loss.ppo_kl_coef": Num(min=0),
    "actor_rollout_ref.actor.use_kl_loss": Bool(),
    "actor_rollout_ref.actor.kl_loss_coef": Num(min=0),
    "actor_rollout_ref.actor.kl_loss_type": OneOf(KL_PENALTIES),
    "actor_rollout_ref.actor.entropy_coeff": Num(min=0),
    "actor_rollout_ref.actor.grad_clip": Num(above=0),
    "actor_rollout_ref.actor.optim.lr": Num(above=0),
    "actor_rollout_ref.actor.optim.weight_decay": Num(min=0),
    "actor_rollout_ref.actor.optim.betas": ListOf(Num(min=0, below=1), length=2),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": Int(min=0),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": OneOf(LR_SCHEDULERS),
    "actor_rollout_ref.actor.optim.min_lr_ratio": FRACTION,
    "actor_rollout_ref.actor.fsdp_config.dtype": OneOf(DTYPE_CHOICES),
    "actor_rollout_ref.actor.fsdp_config.param_offload": Bool(),
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": Bool(),
    "actor_rollout_ref.ref.enable": OneOf(REF_ENABLE),
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": POS_INT,
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": Bool(),
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": POS_INT,
    "actor_rollout_ref.ref.param_offload": Bool(),
    "actor_rollout_ref.rollout.name": OneOf(ROLLOUT_ENGINES),
    "actor_rollout_ref.rollout.n": POS_INT,
    "actor_rollout_ref.rollout.temperature": TEMPERATURE,
    "actor_rollout_ref.rollout.top_p": TOP_P,
    "actor_rollout_ref.rollout.top_k": Int(min=1, off=-1),
    "actor_rollout_ref.rollout.response_length": POS_INT,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": POS_INT,
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": Bool(),
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": POS_INT,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": POS_INT,
    "actor_rollout_ref.rollout.gpu_memory_utilization": Num(above=0, max=1),
    "actor_rollout_ref.rollout.enforce_eager": Bool(),
    "actor_rollout_ref.rollout.free_cache_engine": Bool(),
    "actor_rollout_ref.rollout.vllm_sync_mode": OneOf(VLLM_SYNC_MODES),
    "actor_rollout_ref.rollout.max_num_seqs": POS_INT,
    "actor_rollout_ref.rollout.val_kwargs.temperature": TEMPERATURE,
    "actor_rollout_ref.rollout.val_kwargs.top_p": TOP_P,
    "actor_rollout_ref.rollout.val_kwargs.n": POS_INT,
    "algorithm.adv_estimator": OneOf(ADV_ESTIMATORS),
    "algorithm.norm_adv_by_std_in_grpo": Bool(),
    "algorithm.gamma": Num(above=0, max=1),
    "algorithm.gigpo.step_advantage_w": Num(min=0),
    "algorithm.gigpo.mode": OneOf(GIGPO_MODES),
    "algorithm.use_kl_in_reward": Bool(),
    "algorithm.kl_penalty": OneOf(KL_PENALTIES),
    "algorithm.kl_ctrl.kl_coef": Num(min=0),
    "algorithm.rollout_correction.rollout_is": Optional(OneOf(ROLLOUT_IS_LEVELS), "no IS weights"),
    "algorithm.rollout_correction.rollout_is_threshold": Num(above=0),
    "algorithm.rollout_correction.rollout_rs": Optional(OneOf(ROLLOUT_RS_LEVELS), "no rejection"),
    "algorithm.rollout_correction.rollout_rs_threshold": Optional(Num(above=0), "rollout_is_threshold"),
    "algorithm.rollout_correction.rollout_rs_threshold_lower": Optional(Num(above=0), "1 / upper"),
    "algorithm.rollout_correction.rollout_token_veto_threshold": Optional(Num(above=0), "no veto"),
    "algorithm.rollout_correction.bypass_mode": Bool(),
    "algorithm.dapo.dynamic_sampling.enable": Bool(),
    "algorithm.dapo.dynamic_sampling.mode": OneOf(DYNAMIC_SAMPLING_MODES),
    "algorithm.dapo.dynamic_sampling.metric": OneOf(DYNAMIC_SAMPLING_METRICS),
    "algorithm.dapo.dynamic_sampling.max_num_gen_batches": POS_INT,
    "algorithm.dapo.overlong_reward_shaping.enable": Bool(),
    "algorithm.dapo.overlong_reward_shaping.mode": OneOf(REWARD_SHAPING_MODES),
    "algorithm.dapo.overlong_reward_shaping.buffer_length": Int(min=0),
    "algorithm.dapo.overlong_reward_shaping.penalty_factor": Num(min=0),
    "algorithm.dapo.overlong_reward_shaping.truncation_penalty": Num(min=0),
    "exp_manager.train_rollout_expmode": OneOf(ROLLOUT_EXPMODES),
    "exp_manager.val_rollout_expmode": OneOf(ROLLOUT_EXPMODES),
    "exp_manager.rollout_expratio": FRACTION,
    "exp_manager.train_sample_expmode": OneOf(SAMPLE_EXPMODES),
    "exp_manager.train_sample_keepratio": FRACTION,
    "exp_manager.experience_template": Str("text with {experience} once, then text that ends the block"),
    "exp_manager.init_experience_before_training": Bool(),
    "exp_manager.updated_freq": FREQ,
    "exp_manager.summarizer": OneOf(SUMMARIZERS),
    "exp_manager.summary_max_tokens": POS_INT,
    "exp_manager.top_k": POS_INT,
    "exp_manager.max_pool_size": POS_INT,
    "exp_manager.max_per_task": POS_INT,
    "exp_manager.replay.enable": Bool(),
    "exp_manager.replay.success_threshold": FRACTION,
    "exp_manager.replay.max_replay_per_group": POS_INT,
    "exp_manager.replay.max_tasks": POS_INT,
    "exp_manager.replay.max_per_task": POS_INT,
    "exp_manager.replay.match": OneOf(REPLAY_MATCH),
    "exp_manager.replay.teacher": Optional(OneOf(TEACHERS), "no teacher episodes"),
    "exp_manager.dagger.enable": Bool(),
    "exp_manager.dagger.max_per_group": POS_INT,
    "env.alfworld.data_dir": Optional(Str("a folder holding json_2.1.1/"), "$ALFWORLD_DATA"),
    "env.alfworld.train_split": Str("a folder under json_2.1.1/"),
    "env.alfworld.val_split": Str("a folder under json_2.1.1/"),
    "env.alfworld.task_types": Optional(ListOf(OneOf(TASK_TYPES)), "all six"),
    "env.max_steps": POS_INT,
    "env.rollout_mode": OneOf(ROLLOUT_MODES),
    "env.history_window": Optional(Int(min=0), "all earlier turns"),
    "env.action_projection": OneOf(ACTION_PROJECTIONS),
    "env.system_prompt": OneOf(SYSTEM_PROMPT_STYLES),
    "env.reward.success": Num(),
    "env.reward.format_penalty": Num(min=0),
    "env.reward.inadmissible_penalty": Num(min=0),
    "env.pool.num_workers": POS_INT,
    "env.pool.num_cpus_per_worker": Num(above=0),
    "env.pool.step_timeout_s": Num(above=0),
    "env.pool.reset_timeout_s": Num(above=0),
    "trainer.project_name": Str(),
    "trainer.experiment_name": Str(),
    "trainer.logger": ListOf(OneOf(LOGGERS), single=True),
    "trainer.device": OneOf(DEVICES),
    "trainer.nnodes": POS_INT,
    "trainer.n_gpus_per_node": POS_INT,
    "trainer.total_epochs": POS_INT,
    "trainer.total_training_steps": Optional(POS_INT, "total_epochs × batches per epoch"),
    "trainer.test_freq": FREQ,
    "trainer.save_freq": FREQ,
    "trainer.val_before_train": Bool(),
    "trainer.val_only": Bool(),
    "trainer.default_local_dir": Str("the run's output folder"),
    "trainer.resume_mode": AnyOf((OneOf(RESUME_MODES), Str("a global_step_N folder"))),
    "trainer.max_ckpt_to_keep": POS_INT,
    "trainer.export_hf": Bool(),
    "trainer.seed": Int(min=0),
    "trainer.deterministic": Bool(),
    "trainer.ray.address": Optional(Str("host:port of a running Ray cluster"), "start a local one"),
    "trainer.ray.num_cpus": Optional(POS_INT, "all of this machine's"),
    "sft.epochs": POS_INT,
    "sft.lr": Num(above=0),
    "sft.ppo_mini_batch_size": Optional(POS_INT, "actor_rollout_ref.actor.ppo_mini_batch_size"),
    "sft.teacher": OneOf(TEACHERS),
    "sft.max_detours": Int(min=0),
    "sft.samples_per_game": POS_INT,
}


# ----------------------------------------------------------------------------- cross-field rules
def step_estimator_needs_step_mode(cfg: DictConfig) -> None:
    if ADV_ESTIMATORS[cfg.algorithm.adv_estimator].step_mode_only and cfg.env.rollout_mode != "step":
        fail("algorithm.adv_estimator", cfg.algorithm.adv_estimator,
             "groups turns by their observation: needs env.rollout_mode=step")


def group_estimator_needs_a_group(cfg: DictConfig) -> None:
    n = cfg.actor_rollout_ref.rollout.n
    if ADV_ESTIMATORS[cfg.algorithm.adv_estimator].needs_groups and n < 2:
        fail("actor_rollout_ref.rollout.n", n, f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} "
             "compares rollouts within a group: needs n >= 2")


def mini_batch_divides_rows(cfg: DictConfig) -> None:
    mini = cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    rows = cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
    if cfg.env.rollout_mode == "trajectory" and rows % mini:  # step mode: the number of rows varies
        fail("actor_rollout_ref.actor.ppo_mini_batch_size", mini,
             f"data.train_batch_size × rollout.n = {rows} rows must divide by it (valid: a divisor of {rows})")


def micro_batch_fits_mini_batch(cfg: DictConfig) -> None:
    actor = cfg.actor_rollout_ref.actor
    for key, mini in (("actor_rollout_ref.actor.ppo_mini_batch_size", actor.ppo_mini_batch_size),
                      ("sft.ppo_mini_batch_size", cfg.sft.ppo_mini_batch_size)):
        if mini is not None and actor.ppo_micro_batch_size_per_gpu > mini:
            fail("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", actor.ppo_micro_batch_size_per_gpu,
                 f"must be <= {key} ({mini})")


def trajectory_mode_keeps_all_history(cfg: DictConfig) -> None:
    if cfg.env.rollout_mode == "trajectory" and cfg.env.history_window is not None:
        fail("env.history_window", cfg.env.history_window,
             "trajectory mode keeps the full history in one token sequence: use null")


def step_mode_has_no_kl_in_reward(cfg: DictConfig) -> None:
    if cfg.env.rollout_mode == "step" and cfg.algorithm.use_kl_in_reward:
        fail("algorithm.use_kl_in_reward", True, "step mode has episode-level advantages: use "
             "actor_rollout_ref.actor.use_kl_loss=true for a KL term instead")


def overlong_buffer_fits_response(cfg: DictConfig) -> None:
    shaping, budget = cfg.algorithm.dapo.overlong_reward_shaping, cfg.data.max_response_length
    if shaping.enable and shaping.buffer_length > budget:
        fail("algorithm.dapo.overlong_reward_shaping.buffer_length", shaping.buffer_length,
             f"must be <= data.max_response_length ({budget})")


def policy_loss_settings_agree(cfg: DictConfig) -> None:
    """off_cliprange_high only in vanilla (the one mode reading exp_mask); clip_cov's bounds ordered."""
    actor = cfg.actor_rollout_ref.actor
    pl, key = actor.policy_loss, "actor_rollout_ref.actor.policy_loss"
    if pl.loss_mode != "vanilla" and actor.off_cliprange_high is not None:
        fail("actor_rollout_ref.actor.off_cliprange_high", actor.off_cliprange_high,
             f"only loss_mode=vanilla reads exp_mask; with {key}.loss_mode={pl.loss_mode} use null")
    if pl.clip_cov_ub <= pl.clip_cov_lb:
        fail(f"{key}.clip_cov_ub", pl.clip_cov_ub, f"must be > {key}.clip_cov_lb ({show(pl.clip_cov_lb)})")


def rollout_correction_bounds_and_bypass(cfg: DictConfig) -> None:
    """RS lower <= upper; bypass_mode makes every ratio 1, so IS / RS / veto would do nothing."""
    c, key = cfg.algorithm.rollout_correction, "algorithm.rollout_correction"
    upper = c.rollout_is_threshold if c.rollout_rs_threshold is None else c.rollout_rs_threshold
    if c.rollout_rs_threshold_lower is not None and c.rollout_rs_threshold_lower > upper:
        fail(f"{key}.rollout_rs_threshold_lower", c.rollout_rs_threshold_lower, f"must be <= the upper bound "
             f"({show(upper)})")
    if c.bypass_mode:
        for name in ("rollout_is", "rollout_rs", "rollout_token_veto_threshold"):
            if c[name] is not None:
                fail(f"{key}.{name}", c[name], f"{key}.bypass_mode=true sets pi_old = pi_rollout, so every "
                     "ratio is 1: use null")


def one_gpu_per_engine(cfg: DictConfig) -> None:
    tp = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
    if tp != 1:
        fail("actor_rollout_ref.rollout.tensor_model_parallel_size", tp,
             "must be 1: each rank's Ray actor owns one GPU, so an engine cannot span several")


def temperatures_vllm_accepts(cfg: DictConfig) -> None:
    """vLLM raises 0 < T < 0.01 to 0.01 (vllm/sampling_params.py:557-565), so its log-probs would not be
    the actor's; greedy with n > 1 it refuses ("n must be 1 when using greedy sampling", :766-769)."""
    rollout = cfg.actor_rollout_ref.rollout
    for prefix, node in (("actor_rollout_ref.rollout", rollout), ("actor_rollout_ref.rollout.val_kwargs",
                                                                   rollout.val_kwargs)):
        key, temperature, n = f"{prefix}.temperature", node.temperature, node.n
        if 0 < temperature < 0.01:
            fail(key, temperature, "must be 0 (greedy) or in [0.01, 2] (vLLM raises smaller values to 0.01)")
        if temperature == 0 and n > 1:
            fail(f"{prefix}.n", n, f"greedy sampling ({key}=0) gives n identical samples: use n=1 or a "
                 "temperature > 0")
def task_gen_levels_are_ranges(cfg: DictConfig) -> None:
    g = cfg.data.task_gen
    for knob in ("receptacles", "distractors", "closed_fraction"):
        levels = list(g[knob])
        if not levels or (knob != "closed_fraction" and any(lo > hi for lo, hi in levels)):
            fail(f"data.task_gen.{knob}", OmegaConf.to_container(g[knob]),
                 "must be a non-empty list of levels" + ("" if knob == "closed_fraction" else ", each [lo, hi] with lo <= hi"))


def generated_tasks_need_steps(cfg: DictConfig) -> None:
    if cfg.data.task_source == "generated" and cfg.trainer.total_training_steps is None and not cfg.trainer.val_only:
        fail("trainer.total_training_steps", None, "data.task_source=generated has no epochs: set a number of steps")


def curriculum_needs_generated_tasks(cfg: DictConfig) -> None:
    if cfg.data.task_source == "fixed" and cfg.data.task_gen.curriculum != "uniform":
        fail("data.task_gen.curriculum", cfg.data.task_gen.curriculum,
             "weights generated games: needs data.task_source=generated")


def experience_template_can_be_stripped(cfg: DictConfig) -> None:
    template = cfg.exp_manager.experience_template
    _, sep, tail = template.partition(EXPERIENCE_FIELD)
    if not sep or not tail or EXPERIENCE_FIELD in tail:
        fail("exp_manager.experience_template", template,
             "must contain {experience} exactly once, followed by text that ends the block (e.g. a blank line)")


def replay_teacher_needs_replay(cfg: DictConfig) -> None:
    """Teacher episodes are replayed rows (exp_mask = 1: in bypass_mode the actor still computes their
    old log-probs, since the sampler wrote none)."""
    r = cfg.exp_manager.replay
    if r.teacher is not None and not r.enable:
        fail("exp_manager.replay.teacher", r.teacher, "needs exp_manager.replay.enable=true (or null)")


def dagger_needs_step_mode(cfg: DictConfig) -> None:
    """The expert labels turns (step-mode rows, exp_mask = 1)."""
    if cfg.exp_manager.dagger.enable and cfg.env.rollout_mode != "step":
        fail("exp_manager.dagger.enable", True, "needs env.rollout_mode=step: the expert relabels single turns")


def imitation_needs_off_policy_tokens(cfg: DictConfig) -> None:
    """The self-imitation term reads exp_mask: without replay or guided rollouts it would do nothing."""
    e, coef = cfg.exp_manager, cfg.actor_rollout_ref.actor.imitation_coef
    if coef and not e.replay.enable and not e.dagger.enable and e.train_rollout_expmode == "woexp":
        fail("actor_rollout_ref.actor.imitation_coef", coef, "needs off-policy tokens: exp_manager.replay.enable=true, "
             "exp_manager.dagger.enable=true or exp_manager.train_rollout_expmode=mixed|all (or 0)")


def trainer_syncs_vllm_in_place(cfg: DictConfig) -> None:
    """The trainer always owns a process group, and a rebuild's engine shutdown destroys it
    (vllm/v1/engine/core.py:839 -> distributed/parallel_state.py:2541 destroy_distributed_environment)."""
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.name == "vllm" and rollout.vllm_sync_mode == "rebuild":
        fail("actor_rollout_ref.rollout.vllm_sync_mode", "rebuild", "must be reload in the trainer: a rebuild "
             "shuts the engine down, and vLLM's shutdown destroys the trainer's torch.distributed group")


RULES: tuple[Callable[[DictConfig], None], ...] = (
    task_gen_levels_are_ranges, generated_tasks_need_steps, curriculum_needs_generated_tasks,
    experience_template_can_be_stripped, replay_teacher_needs_replay, dagger_needs_step_mode,
    imitation_needs_off_policy_tokens,
    step_estimator_needs_step_mode, group_estimator_needs_a_group, mini_batch_divides_rows,
    micro_batch_fits_mini_batch, trajectory_mode_keeps_all_history, step_mode_has_no_kl_in_reward,
    overlong_buffer_fits_response, policy_loss_settings_agree, rollout_correction_bounds_and_bypass,
    one_gpu_per_engine, temperatures_vllm_accepts,
    trainer_syncs_vllm_in_place,
)


# ----------------------------------------------------------------------------- applying it
def leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf, without resolving interpolations. Leaves: values, lists, empty
    mappings, and the keys SCHEMA declares as a `Dict` (free-form)."""
    keys = []
    for k in node:
        key, child = f"{prefix}{k}", node._get_node(k)
        if OmegaConf.is_dict(child) and len(child) and not isinstance(SCHEMA.get(key), Dict):
            keys += leaf_keys(child, f"{key}.")
        else:
            keys.append(key)
    return keys


def check_schema(cfg: DictConfig) -> None:
    """Every key of `cfg` is declared, every declared key is there, and each value passes its check."""
    present = set(leaf_keys(cfg))
    for key in sorted(present - set(SCHEMA)):
        fail(key, OmegaConf.select(cfg, key), "no such key in config/base.yaml (nothing reads it)")
    for key, check in SCHEMA.items():
        if key not in present:
            raise ConfigError(f"{key} is missing: config/base.yaml declares it")
        value = OmegaConf.select(cfg, key)
        if not check.ok(value):
            fail(key, value, f"must be {check.what}")


def check_rules(cfg: DictConfig) -> None:
    for rule in RULES:
        rule(cfg)
