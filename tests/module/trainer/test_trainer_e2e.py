"""The trainer end to end on CPU: the real entry point, Ray, env pool, FSDP2 on 2 gloo ranks, HF rollout.

Generated games + the project's tiny model; every run is small (2 tasks × n=4, 4 env steps). Runs use
the recipe's step mode except the env-kill run, which trains in trajectory mode.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir

from agentevolver.main_ppo import CONFIG_DIR, validated
from tests.helpers import REPO, cli_env, main_ppo_cmd, read_metrics, run_main_ppo, run_module, small_overrides

pytestmark = pytest.mark.slow

REQUIRED_KEYS = [
    "step", "train/success_rate", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy",
    "actor/grad_norm", "rollout/probs_diff_mean", "response_length/mean", "prompt_length/mean", "episode/num_turns_mean",
    "episode/format_errors_mean", "episode/invalid_actions_mean", "episode/projected_actions_mean",
    "dynamic_sampling/kept_groups", "dynamic_sampling/empty_step", "dynamic_sampling/empty_steps",
    "dynamic_sampling/num_gen_batches", "timing/step", "timing/gen", "timing/env", "timing/old_log_prob", "timing/ref",
    "timing/update_actor", "timing/sync_weights", "perf/tokens_per_s",
]


# cosine lr decay over the run: the resume test then also checks that the schedule resumes
THREE_COSINE_STEPS = ["trainer.total_training_steps=3", "trainer.save_freq=1", "trainer.test_freq=3",
                      "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine"]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, gen_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    proc = run_main_ppo(small_overrides(tiny_model_dir, gen_data, out) + THREE_COSINE_STEPS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_e2e_metrics_checkpoints_export(full_run):
    rows = read_metrics(full_run)
    assert sorted(rows) == [0, 1, 2, 3]  # step 0 = val_before_train
    for step in (1, 2, 3):
        missing = [k for k in REQUIRED_KEYS if k not in rows[step]]
        assert not missing, missing
        assert rows[step]["rollout/probs_diff_mean"] < 1e-4
        assert 0 <= rows[step]["train/success_rate"] <= 1
        assert rows[step]["timing/step"] > 0 and rows[step]["perf/tokens_per_s"] > 0
        assert (rows[step]["dynamic_sampling/empty_step"], rows[step]["dynamic_sampling/empty_steps"]) == (0, 0)
    assert "val/success_rate" in rows[0] and "val/success_rate" in rows[3]
    # cosine: lr · ½(1 + cos(π·k/3)) at training step k+1 (tiny recipe lr 2e-4)
    assert [rows[k]["actor/lr"] for k in (1, 2, 3)] == pytest.approx([2e-4, 1.5e-4, 0.5e-4], rel=1e-9)
    assert any(k.startswith("train/success_rate/") for k in rows[1])
    # atomic checkpoints, keep-last 2, and the exported HF actor reloads
    steps = sorted(p.name for p in full_run.glob("global_step_*"))
    assert steps == ["global_step_2", "global_step_3"]
    assert (full_run / "latest_checkpointed_iteration.txt").read_text() == "3"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(full_run / "hf_actor")


def test_kill9_then_resume_matches_uninterrupted(full_run, tiny_model_dir, gen_data, tmp_path):
    out = tmp_path / "killed"
    args = main_ppo_cmd(small_overrides(tiny_model_dir, gen_data, out) + THREE_COSINE_STEPS)
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    while not (out / "global_step_1").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and everything it started (a node crash)
    proc.wait()
    assert (out / "global_step_1").is_dir() and not (out / "global_step_3").is_dir()
    resumed = subprocess.run(args, check=False, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    want, got = read_metrics(full_run), read_metrics(out)
    for step in (2, 3):
        for key, value in want[step].items():
            if key.startswith(("timing/", "perf/tokens_per_s")):
                continue
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_validation_only(tiny_model_dir, gen_data, tmp_path):
    out = tmp_path / "val"
    proc = run_main_ppo(small_overrides(tiny_model_dir, gen_data, out) + [
        "trainer.val_only=true", "trainer.logger=[console,file,wandb]"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert list(rows) == [0]
    assert "val/success_rate" in rows[0] and "actor/pg_loss" not in rows[0]
    per_type = [k for k in rows[0] if k.startswith("val/success_rate/")]
    assert len(per_type) == 3  # 3 held-out games of 3 task types, each played exactly once
    assert list((out / "wandb").glob("offline-run-*")), "wandb should log offline by default"


def test_env_actor_killed_mid_rollout(tiny_model_dir, gen_data, tmp_path):
    """One env actor dies mid-rollout: its episodes end as env_error, the step completes."""
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=small_overrides(tiny_model_dir, gen_data, tmp_path) + [
            "trainer.total_training_steps=1", "trainer.val_before_train=false", "trainer.test_freq=0",
            "trainer.save_freq=0", "trainer.export_hf=false", "env.pool.num_workers=2", "env.max_steps=6",
            # the recipe trains in step mode; this run covers trajectory mode end to end
            "env.rollout_mode=trajectory", "env.history_window=null", "env.action_projection=exact"])
    trainer = RayTrainer(validated(cfg))
    killed = threading.Event()

    def kill_when_busy() -> None:
        # Kill as soon as the rollout has assigned its episodes, i.e. while the batched reset is in
        # flight. A kill "a second later" depended on machine load: a random-init model mostly makes
        # format errors, which never step the env, so a worker dying between steps could go unseen.
        # Death between steps is covered at the pool level (tests/test_alfworld_pool.py).
        deadline = time.time() + 300
        while time.time() < deadline:
            if trainer.pool.live_episodes():
                ray.kill(trainer.pool.worker_handles()[0], no_restart=True)
                killed.set()
                return
            time.sleep(0.005)

    threading.Thread(target=kill_when_busy, daemon=True).start()
    try:
        metrics = trainer.fit()
    finally:
        trainer.shutdown()
        ray.shutdown()
    assert killed.is_set()
    assert 0 < metrics["episode/finish_reason/env_error"] < 1
    assert "actor/pg_loss" in metrics  # the step trained on the batch
    assert trainer.pool.num_restarts >= 1


def test_empty_steps_are_said(tiny_model_dir, gen_data, tmp_path):
    """Dynamic sampling on with the random-init model: no episode wins, every group is dropped. Each such
    step says so in one line and counts it; the run says at the end that most steps trained on nothing."""
    out = tmp_path / "empty"
    proc = run_main_ppo(small_overrides(tiny_model_dir, gen_data, out) + [
        "algorithm.dapo.dynamic_sampling.enable=true", "algorithm.dapo.dynamic_sampling.max_num_gen_batches=1",
        "trainer.total_training_steps=2", "trainer.val_before_train=false", "trainer.test_freq=0",
        "trainer.save_freq=0", "trainer.export_hf=false"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line[line.index("warning: "):] for line in proc.stderr.splitlines() if "warning: " in line]
    step_line = ("warning: step {} trained on nothing: dynamic sampling (mode=strict, metric=acc) dropped every "
                 "group of 1 generation batch(es) (train success rate 0.00); the weights did not change").format
    run_line = ("warning: 2 of 2 training steps of this run trained on nothing (dynamic_sampling/empty_steps): the "
                "policy barely changed. A model that never (or always) wins gives no signal: start from a warm start, "
                "python -m agentevolver.sft, then main_ppo with actor_rollout_ref.model.path=<its "
                "trainer.default_local_dir>/hf_actor (README, Running)")
    assert warnings == [step_line(1), step_line(2), run_line], proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [(rows[s]["dynamic_sampling/empty_step"], rows[s]["dynamic_sampling/empty_steps"]) for s in (1, 2)] == [
        (1.0, 1), (1.0, 2)]
    assert all("actor/pg_loss" not in rows[s] for s in (1, 2))


def run_sft(overrides: list[str]) -> subprocess.CompletedProcess:
    proc = run_module("agentevolver.sft", "--config-name", "alfworld_dapo_tiny", *overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sft_overrides(model: Path, data: Path, out: Path) -> list[str]:
    return small_overrides(model, data, out) + [
        "sft.epochs=3", "env.max_steps=12", "sft.lr=1e-3", "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine"]


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, gen_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sft")
    return out, run_sft(sft_overrides(tiny_model_dir, gen_data, out))


def test_sft_warm_start_on_walkthroughs(sft_run):
    """The SFT command reuses the actor worker: teacher-forced walkthroughs win, the loss falls, and a
    cosine schedule decays over the epochs."""
    out, proc = sft_run
    assert "explore-teacher trajectories (won 1.00)" in proc.stdout  # detours + walkthrough still win
    rows = [row for _, row in sorted(read_metrics(out).items())]
    losses = [row["actor/sft_loss"] for row in rows]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert [row["actor/lr"] for row in rows] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])  # ½(1 + cos(π·e/3))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "hf_actor")


def test_sft_never_resumes_from_dapo_checkpoints(sft_run, full_run, tiny_model_dir, gen_data, tmp_path):
    """SFT in a folder holding DAPO checkpoints, resume_mode=auto (the default): it starts from model.path,
    says so, and its first epoch is exactly that of the SFT run in an empty folder."""
    import shutil

    out = tmp_path / "dapo_then_sft"
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("metrics.jsonl", "hf_actor", "wandb"))
    assert sorted(p.name for p in out.glob("global_step_*")) == ["global_step_2", "global_step_3"]
    proc = run_sft(sft_overrides(tiny_model_dir, gen_data, out) + ["trainer.resume_mode=auto"])
    assert "resumed from" not in proc.stdout
    assert (f"sft: starting from {tiny_model_dir}, not from the checkpoints in {out} (resume_mode=auto applies "
            "to main_ppo; name a global_step_N folder to start from it)") in proc.stdout
    first, fresh = read_metrics(out)[0], read_metrics(sft_run[0])[0]
    assert first["actor/sft_loss"] == pytest.approx(fresh["actor/sft_loss"], rel=1e-6)
