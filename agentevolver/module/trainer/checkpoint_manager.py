"""Driver-side checkpoint layout: atomic step folders, keep-last-k, and the resume lookup.

    <default_local_dir>/global_step_<N>/actor/...        sharded model + optimizer + scheduler + RNG (workers)
    <default_local_dir>/global_step_<N>/trainer_state.json  step, epoch, data cursor, driver RNG, wandb id
    <default_local_dir>/latest_checkpointed_iteration.txt   N (verl's name), written last

A step folder is written as `global_step_<N>.tmp` and renamed when complete, so a crash mid-save
never leaves a folder that looks complete.
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
STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointManager:
    def __init__(self, root: str | Path, max_to_keep: int) -> None:
        self.root = Path(root)
        self.max_to_keep = max_to_keep

    def save(self, step: int, trainer_state: dict[str, Any], write_workers: Callable[[Path], None]) -> Path:
        final = self.root / f"global_step_{step}"
        tmp = self.root / f"global_step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_workers(tmp / "actor")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
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

    def find_resume(self, resume_mode: str) -> Path | None:
        """auto → newest complete step folder (or none); disable → none; else the given folder."""
        if resume_mode == "disable":
            return None
        if resume_mode != "auto":
            return Path(resume_mode)
        steps = self.list_steps()
        return steps[-1] if steps else None

    @staticmethod
    def load_trainer_state(path: Path) -> dict[str, Any]:
        return json.loads((Path(path) / "trainer_state.json").read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
