"""`python -m agentevolver.alfworld play` as a user runs it (real subprocess, real Ray, real games)."""
import json
import subprocess

import pytest

from tests.helpers import run_module


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_module("agentevolver.alfworld", *args, timeout=timeout)


@pytest.mark.parametrize("args", [
    ("play", "--games", "/nonexistent/alfworld", "--json"),
    ("play", "--games", "/nonexistent/alfworld", "--split", "valid_seen"),
])
def test_bad_data_dir_is_one_line_error(args):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "env.alfworld.data_dir" in lines[0] and "/nonexistent/alfworld" in lines[0]
    assert "alfworld-download" in lines[0] and "agentevolver.alfworld generate --out DIR --num-games N" in lines[0]


def test_unknown_split_and_command(shared_alfworld):
    proc = _cli("play", "--games", str(shared_alfworld), "--split", "valid_unseen")
    assert proc.returncode == 2 and "available splits: valid_seen, valid_train" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli("fly")
    assert proc.returncode == 2 and "valid: play, generate" in proc.stderr


def test_play_walkthrough_json_on_a_folder_of_games(shared_alfworld):
    folder = shared_alfworld / "json_2.1.1" / "valid_seen" / "look_at_obj_in_light-AlarmClock-None-DeskLamp-323"
    proc = _cli("play", "--games", str(folder), "--policy", "walkthrough", "--json", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["games"] == 1 and summary["won"] == 1 and summary["success_rate"] == 1.0
    assert summary["mean_steps"] == 3.0
    assert summary["per_task_type"] == {"look_at_obj_in_light": {"games": 1, "won": 1}}


def test_play_human_reads_stdin(shared_alfworld):
    folder = shared_alfworld / "json_2.1.1" / "valid_seen" / "look_at_obj_in_light-AlarmClock-None-DeskLamp-323"
    # Commands typed by hand (case is forgiven, like a model's answer).
    proc = run_module("agentevolver.alfworld", "play", "--games", str(folder), "--policy", "human", "--json",
                      "--workers", "1", input="go to desk 1\nuse desklamp 1\nTake alarmclock 2 from desk 1\n",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Your task is to: examine the alarmclock with the desklamp." in proc.stderr  # shown to the human
    assert " 1. go to bed 1" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["won"] == 1 and summary["mean_steps"] == 3.0


def test_make_policy_registry_is_the_only_dispatch():
    from agentevolver.alfworld import play

    assert list(play.POLICIES) == ["walkthrough", "random", "human"]
    assert type(play.make_policy("walkthrough", 3)) is play.WalkthroughPolicy
    assert play.make_policy("walkthrough", 3).seed == 3 and play.make_policy("random", 5).rng.random() == \
        play.RandomPolicy(5).rng.random()
    assert type(play.make_policy("human", 0)) is play.HumanPolicy
    with pytest.raises(ValueError, match="valid: walkthrough, random, human"):
        play.make_policy("oracle", 0)
