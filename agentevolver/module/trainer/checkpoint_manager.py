"""Driver-side checkpoint layout: complete-marked step folders, keep-last-k, and the resume lookup.

    <default_local_dir>/global_step_<N>/actor/...           sharded model + optimizer (DCP) + per-rank
                                                            scheduler / RNG (extra_state_rank<r>.pt)
    <default_local_dir>/global_step_<N>/trainer_state.json  step, epoch, data cursor, driver RNG, wandb id
    <default_local_dir>/global_step_<N>/COMPLETE.json       written last: world size + every file's size
    <default_local_dir>/latest_checkpointed_iteration.txt   N (verl's name)

A step folder is written as `global_step_<N>.tmp`; once every rank's shard and the trainer state are
on disk, the marker lists each file with its size, and the folder is renamed. A checkpoint is complete
only when its marker is there and every file it lists has its recorded size: a crash mid-save, a
truncated shard or a deleted trainer_state.json all read as incomplete. `resume_mode=auto` takes the
newest complete checkpoint and says which newer ones it skipped and why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESUME_MODES = ("auto", "disable")  # trainer.resume_mode, besides a global_step_N folder path
LATEST = "latest_checkpointed_iteration.txt"
MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message is one line."""


def rank_files(world_size: int) -> list[str]:
    """Files every save must hold besides the DCP shards: the DCP index and each rank's extra state."""
    return ["actor/actor/.metadata", *(f"actor/extra_state_rank{r}.pt" for r in range(world_size))]


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_marker(folder: Path, step: int, world_size: int) -> None:
    """The completion marker, written last: refuses when a rank's file or the trainer state is missing."""
    sizes = _sizes(folder)
    missing = [f for f in (TRAINER_STATE, *rank_files(world_size)) if f not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing {', '.join(missing)} after the save")
    _atomic_write(folder / MARKER, json.dumps({"step": step, "world_size": world_size, "files": sizes}, indent=1))


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint (one phrase), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save did not finish, or the folder predates completion markers)"
    try:
        info = json.loads(marker.read_text())
        files, world_size = dict(info["files"]), int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} ({type(e).__name__})"
    for name in (TRAINER_STATE, *rank_files(world_size)):
        if name not in files:
            return f"{MARKER} does not list {name}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {MARKER} says {size}"
    return None


class CheckpointManager:
    def __init__(self, root: str | Path, max_to_keep: int) -> None:
        self.root = Path(root)
        self.max_to_keep = max_to_keep

    def save(self, step: int, trainer_state: dict[str, Any], write_workers: Callable[[Path], None],
             world_size: int) -> Path:
        """Workers write `<tmp>/actor`, then the trainer state, then the marker, then the rename."""
        final = self.root / f"global_step_{step}"
        tmp = self.root / f"global_step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_workers(tmp / "actor")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        write_marker(tmp, step, world_size)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(self.root / LATEST, str(step))
        self._prune()
        return final

    def _prune(self) -> None:
        for path in self.list_steps()[: -self.max_to_keep]:
            shutil.rmtree(path, ignore_errors=True)

    def list_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def newest_complete(self) -> tuple[Path | None, list[str]]:
        """(newest complete step folder or None, one 'name: why' per newer folder skipped)."""
        skipped = []
        for path in reversed(self.list_steps()):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, skipped
            skipped.append(f"{path.name}: {problem}")
        return None, skipped

    def find_resume(self, resume_mode: str) -> tuple[Path | None, str | None]:
        """(folder to resume from, the one line to print about skipped checkpoints or None).

        auto → the newest complete step folder (or none); disable → none; else the given folder, which
        must be complete (CheckpointError, one line)."""
        if resume_mode == "disable":
            return None, None
        if resume_mode != "auto":
            problem = checkpoint_problem(resume_mode)
            if problem:
                raise CheckpointError(f"trainer.resume_mode={resume_mode!r} is not a complete checkpoint: {problem}")
            return Path(resume_mode), None
        path, skipped = self.newest_complete()
        if not skipped:
            return path, None
        target = f"resuming from {path.name}" if path else "no complete checkpoint left: starting from step 0"
        return path, f"resume: skipped incomplete {'; '.join(skipped)}; {target}"

    def resume_hint(self) -> str:
        """Whether a checkpoint is usable after a stop, and how to resume (one phrase)."""
        path, _ = self.newest_complete()
        if path is None:
            return f"no complete checkpoint in {self.root}: a rerun starts from step 0"
        return (f"last complete checkpoint {path}: rerun the same command to resume from it "
                "(trainer.resume_mode=auto)")

    @staticmethod
    def load_trainer_state(path: Path) -> dict[str, Any]:
        return json.loads((Path(path) / TRAINER_STATE).read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
