"""Issue 14 item 12: one run per output folder (trainer.default_local_dir), stale locks taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from agentevolver.module.trainer.run_lock import LOCK_FILE, RunLock, RunLockError
from tests.helpers import REPO, one_line_error, run_main_ppo

HOLD = ("import sys, time; from agentevolver.module.trainer.run_lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/out."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_lock_file_names_pid_and_host_and_is_removed_at_release(tmp_path):
    lock = RunLock(tmp_path / "out")
    assert lock.acquire() is None
    owner = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    assert RunLock(tmp_path / "out").acquire() is None  # free again


def test_a_live_holder_refuses_a_second_run(holder):
    out, proc = holder
    with pytest.raises(RunLockError) as info:
        RunLock(out).acquire()
    msg = str(info.value)
    print(msg)
    assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "it holds the lock" in msg and "\n" not in msg


def test_a_dead_holder_is_taken_over_with_one_line(holder):
    out, proc = holder
    proc.kill()  # kill -9: the kernel drops its flock, the file stays behind
    proc.wait()
    assert (out / LOCK_FILE).is_file()
    note = RunLock(out).acquire()
    print(note)
    assert note.startswith(f"taking over the stale lock {out / LOCK_FILE} (pid {proc.pid} on ")
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_stale_file_without_flock_is_judged_by_pid(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": host, "started": time.time()}))
    assert "is not running" in RunLock(out).acquire()
    # a live pid written in the file refuses even where flock does not reach (e.g. some network mounts)
    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": host, "started": time.time()}))
    with pytest.raises(RunLockError, match="the process is running"):
        RunLock(other).acquire()
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()}))
    with pytest.raises(RunLockError, match=f"another host: delete {remote / LOCK_FILE}"):
        RunLock(remote).acquire()


def test_second_run_exits_2_with_one_line(holder, tiny_model_dir, shared_alfworld, tmp_path):
    out, proc = holder
    err = one_line_error(run_main_ppo([
        f"actor_rollout_ref.model.path={tiny_model_dir}", f"env.alfworld.data_dir={shared_alfworld}",
        "env.alfworld.train_split=valid_train", f"trainer.default_local_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]))
    assert err.startswith(f"error: trainer.default_local_dir='{out}' is in use by another run (pid {proc.pid} ")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the second run was written
