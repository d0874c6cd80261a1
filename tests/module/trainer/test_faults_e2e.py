"""Issue 14 item 14, end to end through main_ppo: Ctrl-C during a rollout, and kill -9 of one actor
rank during update_actor. Each stops with ONE line (what happened, whether a checkpoint is usable,
how to resume), the right exit code, no Ray process of the run left, and the last complete checkpoint
resumes. Also covers item 13 end to end (a broken game is skipped, listed and counted)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agentevolver.alfworld.data import BROKEN_GAMES_FILE, GAME_FILE
from agentevolver.module.trainer.checkpoint_manager import MARKER
from tests.helpers import REPO, cli_env, main_ppo_cmd, read_metrics, small_overrides

pytestmark = pytest.mark.slow
TWO_STEPS = ["trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=0",
             "trainer.val_before_train=false", "trainer.export_hf=false", "data.max_broken_game_frac=0.5"]


@pytest.fixture(scope="module")
def faulty_data(tmp_path_factory) -> Path:
    """Generated games, one of which has a game file cut mid-write."""
    from agentevolver.alfworld.generator import generate_games

    out = tmp_path_factory.mktemp("games")
    generate_games(out, 4, seed=11, split="train", max_receptacles=8)
    generate_games(out, 2, seed=12, split="valid_seen", max_receptacles=8)
    victim = max((out / "json_2.1.1" / "train").glob(f"*/*/{GAME_FILE}"))
    victim.write_text(victim.read_text()[:100])
    return out


def run_processes(token: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process started by the run tagged `token` (driver, raylet, gcs,
    ray:: workers all inherit the driver's environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"AE_FAULT_RUN={token}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if cmd:  # zombies have an empty cmdline
                    found.append((int(proc.name), cmd))
        except OSError:
            continue
    return found


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def start(args: list[str], out: Path, token: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=REPO, env=cli_env(AE_FAULT_RUN=token), start_new_session=True,
                            stdout=open(out.parent / f"{out.name}.stdout", "w"),
                            stderr=open(out.parent / f"{out.name}.stderr", "w"))


def assert_no_process_left(token: str) -> None:
    deadline = time.time() + 60
    while run_processes(token) and time.time() < deadline:
        time.sleep(0.5)
    assert run_processes(token) == []


def resume_and_check(args: list[str], out: Path) -> None:
    resumed = subprocess.run(args, check=False, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'global_step_1'} at step 1" in resumed.stdout
    assert (out / "global_step_2" / MARKER).is_file()
    rows = read_metrics(out)
    assert sorted(rows) == [1, 2] and rows[2]["data/skipped_games"] == 1


def test_sigint_during_rollout(tiny_model_dir, faulty_data, tmp_path):
    out, token = tmp_path / "sigint", uuid.uuid4().hex
    args = main_ppo_cmd(small_overrides(tiny_model_dir, faulty_data, out) + TWO_STEPS)
    proc = start(args, out, token)
    wait_for(lambda: (out / "global_step_1" / MARKER).is_file(), 400, "checkpoint 1", proc)
    # step 2's rollout: a rank is inside generate
    wait_for(lambda: [p for p, cmd in run_processes(token) if cmd.startswith("ray::ActorRolloutRefWorker.generate")],
             300, "step 2's rollout", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "sigint.stderr").read_text()
    print(err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert lines == [(f"interrupted (SIGINT) in training step 2; last complete checkpoint {out / 'global_step_1'}: "
                     "rerun the same command to resume from it (trainer.resume_mode=auto)")]
    assert "Traceback" not in err
    assert_no_process_left(token)
    assert not (out / "run.lock").exists()  # released on the way out
    assert (out / BROKEN_GAMES_FILE).read_text().count("\n") == 1
    resume_and_check(args, out)


def test_kill9_of_a_rank_during_update_actor(tiny_model_dir, faulty_data, tmp_path):
    out, token = tmp_path / "rank", uuid.uuid4().hex
    args = main_ppo_cmd(small_overrides(tiny_model_dir, faulty_data, out) + TWO_STEPS)
    proc = start(args, out, token)
    wait_for(lambda: (out / "global_step_1" / MARKER).is_file(), 400, "checkpoint 1", proc)
    pids = wait_for(lambda: [p for p, cmd in run_processes(token)
                             if cmd.startswith("ray::ActorRolloutRefWorker.update_actor")], 300,
                    "step 2's update_actor", proc)
    os.kill(pids[0], signal.SIGKILL)
    code = proc.wait(timeout=180)
    err = (tmp_path / "rank.stderr").read_text()
    print(err[-3000:])
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error: actor rank")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: actor rank ") and " of 2 died during update_actor (the process exited" in lines[0]
    assert lines[0].endswith(f"last complete checkpoint {out / 'global_step_1'}: rerun the same command to resume "
                             "from it (trainer.resume_mode=auto)")
    assert "Traceback" not in err
    assert_no_process_left(token)
    resume_and_check(args, out)
    assert json.loads((out / "global_step_2" / MARKER).read_text())["world_size"] == 2
