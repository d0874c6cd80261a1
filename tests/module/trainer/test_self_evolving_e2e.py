"""Issue 16 end to end (real trainer, Ray, gloo, env pool, background task generator): generated tasks with
the success curriculum, experience-guided rollouts (pool seeded from walkthroughs) and replay all on;
a resume from a checkpoint with a non-empty pool and curriculum reproduces the uninterrupted run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_main_ppo, small_overrides

pytestmark = pytest.mark.slow

SELF_EVOLVING = ["data.task_source=generated", "data.task_gen.curriculum=success_pq",
                 "exp_manager.train_rollout_expmode=mixed", "exp_manager.init_experience_before_training=true",
                 "exp_manager.replay.enable=true", "actor_rollout_ref.actor.off_cliprange_high=0.6"]


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    from agentevolver.alfworld.generator import generate_games

    out = tmp_path_factory.mktemp("games")
    generate_games(out, 2, seed=12, split="valid_seen", max_receptacles=4, min_receptacles=3,
                   num_distractors=(0, 0), closed_fraction=0.0)
    return out


def overrides(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return small_overrides(model, data, out) + [
        f"trainer.total_training_steps={steps}", "trainer.save_freq=1", "trainer.test_freq=3", "trainer.export_hf=false",
        *SELF_EVOLVING]


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = run_main_ppo(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_generated_curriculum_experience_resume(tiny_model_dir, val_data, tmp_path):
    full = tmp_path / "full"
    run(overrides(tiny_model_dir, val_data, full, 3))
    want = read_metrics(full)
    for step in (1, 2, 3):
        row = want[step]
        assert row["experience/pool_size"] >= 1  # seeded from the planner walkthroughs
        assert row["experience/injected_rows"] > 0 and row["experience/off_policy_rows"] > 0
        assert "actor/pg_loss_on" in row and "actor/pg_loss_off" in row
        assert sum(v for k, v in row.items() if k.startswith(("curriculum/weight/pick",
                                                                         "curriculum/weight/look"))) == pytest.approx(1.0)
        assert row["timing/task_gen"] <= 0.05 * row["timing/step"]
    assert want[3]["curriculum/games_made"] == 2 * (3 + 2)  # 3 drawn batches + 2 prefetched, never a repeat
    made = sorted(p.name for p in (full / "generated_tasks").rglob("trial_*"))
    assert len(made) == len(set(made)) == 10
    state = json.loads((full / "global_step_2" / "trainer_state.json").read_text())["self_evolving"]
    assert state["experience"]["pool"] and state["task_source"]["curriculum"]
    # resume from step 2's checkpoint into a fresh folder: step 3 must match the uninterrupted run
    resumed = tmp_path / "resumed"
    proc = run(overrides(tiny_model_dir, val_data, resumed, 3) + [f"trainer.resume_mode={full / 'global_step_2'}"])
    assert "resumed from" in proc.stdout
    got = read_metrics(resumed)
    assert sorted(got) == [3]
    for key, value in want[3].items():
        if key.startswith(("timing/", "perf/tokens_per_s")):
            continue
        assert got[3][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    gen_full = {p.name: p.joinpath("game.tw-pddl").read_bytes() for p in (full / "generated_tasks").rglob("trial_*")}
    gen_res = {p.name: p.joinpath("game.tw-pddl").read_bytes() for p in (resumed / "generated_tasks").rglob("trial_*")}
    assert gen_res and all(gen_full[k] == v for k, v in gen_res.items())  # re-made pending games: same bytes


def test_teacher_replay_on_fresh_games(tiny_model_dir, val_data, tmp_path):
    """exp_manager.replay.teacher: a failing group of a fresh game gets the teacher's episode of that very
    game, trained off-policy (exp_mask = 1); no generated game has a held-out game's problem."""
    from agentevolver.alfworld.data import problem_keys

    out = tmp_path / "teacher"
    run(small_overrides(tiny_model_dir, val_data, out) + [
        "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.test_freq=2", "trainer.export_hf=false",
        "data.task_source=generated", "exp_manager.replay.enable=true", "exp_manager.replay.teacher=walkthrough",
        "exp_manager.replay.max_replay_per_group=2", "exp_manager.replay.success_threshold=1.0",  # every group short of 4 wins of 4 gets one
        "env.max_steps=8", "data.task_gen.receptacles=[[3,3]]", "data.task_gen.distractors=[[0,0]]",
        "data.task_gen.closed_fraction=[0.0]"])  # walkthroughs of 4-8 commands: the teacher wins in 8 steps
    rows = read_metrics(out)
    for step in (1, 2):
        row = rows[step]
        assert row["experience/teacher_episodes"] >= 2  # two per wanting game (max_replay_per_group)
        assert row["experience/replayed_rows"] > 0 and row["experience/off_policy_rows"] >= row["experience/replayed_rows"]
        assert "actor/pg_loss_off" in row
    made = [p for p in (out / "generated_tasks").rglob("trial_*")]
    assert made and not problem_keys(made) & problem_keys(p for p in val_data.rglob("trial_*"))


def test_dagger_relabels_failed_episodes(tiny_model_dir, val_data, tmp_path):
    """exp_manager.dagger: every failed episode (the untrained tiny model fails them all) also gives an episode
    of the expert's commands in its own states: exp_mask = 1 rows that keep all-failed groups in the batch,
    never counted as played (train/success_rate, generated tokens)."""
    out = tmp_path / "dagger"
    run(small_overrides(tiny_model_dir, val_data, out) + [
        "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.test_freq=2", "trainer.export_hf=false",
        "data.task_source=generated", "exp_manager.dagger.enable=true", "exp_manager.dagger.max_per_group=2",
        "algorithm.dapo.dynamic_sampling.enable=true", "data.task_gen.receptacles=[[3,3]]",
        "data.task_gen.distractors=[[0,0]]", "data.task_gen.closed_fraction=[0.0]"])
    rows = read_metrics(out)
    for step in (1, 2):
        row = rows[step]
        assert row["train/success_rate"] == 0.0
        assert row["experience/dagger_rows"] > 0 and row["experience/off_policy_rows"] == row["experience/dagger_rows"]
        assert row["experience/replayed_rows"] == 0
        # every group failed, yet its 2 relabelled episodes give it a signal: dynamic sampling keeps it
        assert row["dynamic_sampling/kept_groups"] == 2 and row["dynamic_sampling/num_gen_batches"] == 1
        assert "actor/pg_loss_off" in row
