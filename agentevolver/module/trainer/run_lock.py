"""One run per output folder: `<trainer.default_local_dir>/run.lock`, held for the life of a run.

The file holds the owner's pid, host and start time (for the message a second run prints) and is
`flock`ed while the run lives. The kernel drops a flock when its process dies, however it dies
(kill -9 included), so a lock file whose flock can be taken is stale; the pid is checked as well, for
file systems where flock does not reach other processes. A stale lock is taken over with one line.
A lock written on another host cannot be checked from here and refuses the start (delete it by hand
once that run is gone).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockError(RuntimeError):
    """The output folder is in use by another run; the message is one line."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`acquire()` (raises RunLockError) at start, `release()` at the end (main_ppo.output_dir_locked)."""

    def __init__(self, out_dir: str | os.PathLike, key: str = "trainer.default_local_dir") -> None:
        self.out_dir, self.key = Path(out_dir), key
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    def _refuse(self, owner: dict, why: str) -> RunLockError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        return RunLockError(
            f"{self.key}={str(self.out_dir)!r} is in use by another run (pid {owner.get('pid')} on "
            f"{owner.get('host')}, since {since}; {why}): give this run its own {self.key}, or stop that one")

    def acquire(self) -> str | None:
        """Take the lock; returns the one line to print when a stale lock was taken over, else None."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(_read_owner(fd), "it holds the lock") from None
            owner = _read_owner(fd)
            note = None
            if owner:
                host, pid = owner.get("host"), int(owner.get("pid", -1))
                if host != socket.gethostname():
                    raise self._refuse(owner, f"another host: delete {self.path} if that run is gone")
                if pid != os.getpid() and pid_alive(pid):
                    raise self._refuse(owner, "the process is running")
                note = (f"taking over the stale lock {self.path} (pid {pid} on {host} is not running; "
                        "its last complete checkpoint is resumed with trainer.resume_mode=auto)")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return note

    def release(self) -> None:
        """Remove the file, then drop the flock (the order keeps a waiting run from reading a stale owner)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"pid": -1, "host": socket.gethostname(), "started": 0}  # half-written by a killed run
